"""
Many MiniLM classifiers in one pass: the encoder written out as a function of a parameter dict, in which each
tensor is either shared by every model (shape as in BertModel) or stacked, one copy per model (a leading S).

LoRA keeps the encoder frozen, so every adapter shares its weights and only A, B and the head are stacked: one
forward and backward over the encoder per step for S adapters, each with its own batch, its own A and B, and (in
trainer.CosineAdam) its own learning rate. Full finetuning stacks every tensor: S whole encoders, batched matrix
products. Nothing couples the models, so this is S separate trainings (tests/test_text_experiment.py checks it
against one model at a time through Hugging Face's BertModel and lora.py).

Every batch has the same length (the task's max_len), so the whole training step has fixed shapes and
trainer.fit can replay it from a CUDA graph: one launch per step instead of hundreds.

    params = stack_models([model_0, model_1, ...])        # SentimentClassifier, with or without lora.add_lora
    logits = forward(params, ids, config, train=True)     # ids (S, B, L) -> (S, B, 2)
"""

import torch
import torch.nn.functional as F
from transformers import BertConfig

import lora
import nf4

from .model import SentimentClassifier

PREFIX = "encoder."  # SentimentClassifier's encoder: its parameters are "encoder.embeddings...", "encoder.encoder.layer..."


def stack_models(models: list[SentimentClassifier]) -> dict[str, torch.Tensor]:
    """One dict for S models of one method: the trainable tensors stacked (S, ...) as leaf tensors that require
    grad, the frozen ones taken once from the first model (they are the same pretrained weights in every model).
    LoRA's scaling goes in as "lora_scaling" (a float tensor: every layer of a method has the same r and alpha).
    An NF4 base (QLoRA: nf4.LinearNF4, wrapped or not) goes in as its dequantized weight, the very W its forward
    multiplies by: the stacked models train over the 4-bit base's values (savings.py measures its memory)."""
    named = [dict(m.named_parameters()) for m in models]
    params = {}
    for name, p in named[0].items():
        if p.requires_grad:
            params[name] = torch.stack([n[name].detach() for n in named]).requires_grad_(True)  # (S, ...)
        else:
            params[name] = p.detach()
    for name, module in models[0].named_modules():
        if isinstance(module, nf4.NF4Weight):
            params[f"{name}"] = module.dequantize().detach()  # "...query.weight": (out, in) in the compute dtype
    scalings = {layer.scaling for _, layer in lora.lora_layers(models[0])}
    if len(scalings) > 1:
        raise ValueError(f"one LoRA scaling per method expected, found {sorted(scalings)}")
    if scalings:
        params["lora_scaling"] = torch.tensor(scalings.pop())
    return params


def linear(p: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """x (S, M, in) -> (S, M, out): W x + b, shared or stacked, plus LoRA's scaling · B A x where `name` has one."""
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    if w.dim() == 2:
        y = F.linear(x, w, b)  # (S, M, in) @ (in, out): one matrix product for every model
    else:
        y = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))  # (S, M, in) @ (S, in, out) -> (S, M, out)
    if f"{name}.lora_A" in p:
        A, B = p[f"{name}.lora_A"], p[f"{name}.lora_B"]  # (S, r, in), (S, out, r)
        y = y + p["lora_scaling"] * ((x @ A.transpose(1, 2)) @ B.transpose(1, 2))  # (S, M, r) -> (S, M, out)
    return y


def layer_norm(p: dict[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of x (S, M, d), with shared (d,) or stacked (S, d) weight and bias."""
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    if w.dim() == 1:
        return F.layer_norm(x, w.shape, w, b, eps)
    return F.layer_norm(x, w.shape[-1:], None, None, eps) * w.unsqueeze(1) + b.unsqueeze(1)


def embed(p: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Word + position + token type 0 embeddings of ids (S, B, L) -> (S, B, L, d)."""
    S, _, L = ids.shape
    word, pos, kind = (p[f"{PREFIX}embeddings.{k}_embeddings.weight"] for k in ("word", "position", "token_type"))
    if word.dim() == 2:
        x = F.embedding(ids, word)  # (S, B, L, d)
    else:  # model s reads its own table: offset its ids by s * vocab into the flattened (S * vocab, d) tables
        offset = torch.arange(S, device=ids.device).view(S, 1, 1) * word.shape[1]
        x = F.embedding(ids + offset, word.flatten(0, 1))
    pos = pos[:L] if pos.dim() == 2 else pos[:, None, :L]  # (L, d) or (S, 1, L, d)
    kind = kind[0] if kind.dim() == 2 else kind[:, None, None, 0]  # (d,) or (S, 1, 1, d)
    return x + pos + kind


def forward(p: dict[str, torch.Tensor], ids: torch.Tensor, config: BertConfig, train: bool) -> torch.Tensor:
    """Logits (S, B, 2) of S models on their own batches ids (S, B, L), [PAD] = 0; BertModel's post-LayerNorm
    layers, mean pooling over the real tokens, then each model's head. Dropout as the config says, when train."""
    S, B, L = ids.shape
    d, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
    p_hidden = config.hidden_dropout_prob if train else 0.0
    p_attn = config.attention_probs_dropout_prob if train else 0.0
    mask = ids != 0  # (S, B, L): the real tokens
    keep = mask.view(S * B, 1, 1, L)  # which keys each query may attend to
    x = embed(p, ids).view(S, B * L, d)
    x = F.dropout(layer_norm(p, f"{PREFIX}embeddings.LayerNorm", x, eps), p_hidden, train)

    def split_heads(t):  # (S, B*L, d) -> (S*B, heads, L, d/heads)
        return t.view(S * B, L, heads, d // heads).transpose(1, 2)
    for i in range(config.num_hidden_layers):
        name = f"{PREFIX}encoder.layer.{i}."
        q, k, v = (split_heads(linear(p, name + f"attention.self.{w}", x)) for w in ("query", "key", "value"))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p_attn)  # (S*B, heads, L, d/heads)
        ctx = ctx.transpose(1, 2).reshape(S, B * L, d)
        attn = F.dropout(linear(p, name + "attention.output.dense", ctx), p_hidden, train)
        x = layer_norm(p, name + "attention.output.LayerNorm", x + attn, eps)
        ff = linear(p, name + "output.dense", F.gelu(linear(p, name + "intermediate.dense", x)))
        x = layer_norm(p, name + "output.LayerNorm", x + F.dropout(ff, p_hidden, train), eps)
    real = mask.view(S, B, L, 1).to(x.dtype)
    pooled = (x.view(S, B, L, d) * real).sum(2) / real.sum(2).clamp(min=1e-9)  # mean over real tokens (S, B, d)
    w, b = p["head.weight"], p["head.bias"]  # (S, 2, d), (S, 2)
    logits = torch.baddbmm(b.unsqueeze(1), pooled, w.transpose(1, 2))  # (S, B, d) @ (S, d, 2) -> (S, B, 2)
    return logits.to(w.dtype)  # bf16 under autocast: back to the weights' dtype for the loss


def train_flops(p: dict[str, torch.Tensor], config: BertConfig, tokens: int, length: int) -> float:
    """Matrix-multiply FLOPs of one training step over `tokens` tokens (all models together) in sequences of
    `length`: the forward's 2 per multiply-add, the backward's input gradients as much again wherever a gradient
    must flow below, and weight gradients as much again for every trained weight. Embeddings, norms and
    element-wise work are left out; attention's scores and weighted sums are counted (flash attention's
    recomputation is not)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    full = p[f"{PREFIX}encoder.layer.0.attention.self.query.weight"].dim() == 3
    weights = layers * (4 * d * d + 2 * d * config.intermediate_size)  # the encoder's linear layers
    lora_weights = sum(t[0].numel() for n, t in p.items() if n.endswith(("lora_A", "lora_B")))
    attention = layers * 2 * length * d  # q k^T and probs v, per token, multiply-adds
    forward_ = 2 * (weights + lora_weights + attention)
    backward = 2 * (weights + lora_weights + attention) + 2 * (weights if full else lora_weights)
    return tokens * (forward_ + backward)

"""
MiniLM as a sentence classifier: sentence-transformers' all-MiniLM-L6-v2, a 6-layer BERT encoder
(hidden 384, 12 heads), mean-pooled over the real tokens as sentence-transformers does, then a linear head.

Local files only, from a folder data.find_minilm() verified: nothing is fetched from the Hugging Face hub.
The weights are upcast to float32 whatever dtype the file stores (the float16 transfer copy included), and every
encoder tensor must come from the file: nothing is left at its random initialisation.

    folder, provenance = data.find_minilm()
    model = SentimentClassifier(load_encoder(folder))
    lora.add_lora(model, r=8, targets=TARGET_SETS["qv"])
"""

import json
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
from tokenizers import Tokenizer
from transformers import BertConfig, BertModel

from ..storage import DataError

WEIGHTS = "model.safetensors"
# In the file but not in our encoder, and why leaving them out is safe:
IGNORED = {
    "pooler.dense.weight": "BERT's [CLS] pooler: sentence-transformers mean-pools instead and never runs it",
    "pooler.dense.bias": "the same pooler",
    "embeddings.position_ids": "the constant arange(512) buffer BertModel builds itself (checked equal)",
}
# Patterns for lora.add_lora on the whole SentimentClassifier (or on its encoder: both match "*."-globs).
# The head never matches: it trains in full in every method.
_QV = ["*.attention.self.query", "*.attention.self.value"]
_QKVO = ["*.attention.self.query", "*.attention.self.key", "*.attention.self.value", "*.attention.output.dense"]
TARGET_SETS = {
    "qv": _QV,  # Wq, Wv in each of the 6 layers: 12 layers wrapped
    "qkvo": _QKVO,  # + Wk and the attention output Wo (attention.output.dense, not the FFN's output.dense): 24
    "all": _QKVO + ["*.intermediate.dense", "*.layer.*.output.dense"],  # every nn.Linear of the encoder: 36
}


def load_encoder(folder: Path, dropout: bool = True) -> BertModel:
    """BertModel from folder's config.json, no pooler, every tensor from model.safetensors upcast to float32.
    dropout=False sets the config's dropout probabilities to 0 (the tests compare trainings without it).

    Raises DataError if the file lacks a tensor, has one it should not, or a shape differs. In eval mode.
    """
    folder = Path(folder)
    config = BertConfig.from_json_file(folder / "config.json")
    if not dropout:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    encoder = BertModel(config, add_pooling_layer=False).to(torch.float32)
    stored = safetensors.torch.load_file(folder / WEIGHTS)
    expected = encoder.state_dict()
    missing = sorted(expected.keys() - stored.keys())
    unexpected = sorted(stored.keys() - expected.keys() - IGNORED.keys())
    if missing or unexpected:
        raise DataError(f"{folder / WEIGHTS}: missing tensors {missing}, unexpected tensors {unexpected}; expected "
                        f"the {len(expected)} tensors of BertModel(config.json, add_pooling_layer=False)"
                        f" and at most {sorted(IGNORED)}")
    shapes = [f"{k} {tuple(stored[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
              if stored[k].shape != v.shape or not stored[k].is_floating_point()]
    if shapes:
        raise DataError(f"{folder / WEIGHTS}: wrong shape or not floating point: {shapes}")
    positions = stored.get("embeddings.position_ids")
    if positions is not None and not torch.equal(positions.view(-1).long(),
                                                 encoder.embeddings.position_ids.view(-1)):
        raise DataError(f"{folder / WEIGHTS}: embeddings.position_ids is not arange({config.max_position_embeddings})")
    # Explicitly float32: a float16 file would otherwise decide the dtype the model computes in.
    encoder.load_state_dict({k: stored[k].to(torch.float32) for k in expected}, strict=True)
    return encoder.eval()


def load_tokenizer(folder: Path) -> Tokenizer:
    """The fast WordPiece tokenizer of tokenizer.json, lower-casing as tokenizer_config.json says.

    tokenizer.json ships with truncation and padding at 128; both are switched off here: tokenize() decides.
    """
    folder = Path(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    lower = json.loads((folder / "tokenizer_config.json").read_text()).get("do_lower_case", False)
    if (tokenizer.normalizer.normalize_str("A") == "a") != lower:
        raise DataError(f"{folder / 'tokenizer.json'}: its normalizer does not match do_lower_case={lower} "
                        f"of {folder / 'tokenizer_config.json'}")
    if tokenizer.token_to_id("[PAD]") != 0:
        raise DataError(f"{folder / 'tokenizer.json'}: [PAD] has id {tokenizer.token_to_id('[PAD]')}, expected 0")
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: Sequence[str], max_len: int,
             pad_to_max_len: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (N, L) int64: [CLS] text [SEP], truncated to max_len tokens (the
    [SEP] kept), right-padded with [PAD] = 0 to the longest in the batch, or to max_len if pad_to_max_len."""
    if isinstance(texts, str) or not texts:
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.80}")
    tokenizer.enable_truncation(max_len)  # set on every call, so no earlier call's setting leaks in
    encodings = tokenizer.encode_batch(list(texts))
    length = max_len if pad_to_max_len else max(len(e.ids) for e in encodings)
    input_ids = torch.zeros(len(encodings), length, dtype=torch.int64)  # (N, L), [PAD] = 0
    attention_mask = torch.zeros(len(encodings), length, dtype=torch.int64)  # (N, L), 1 on real tokens
    for i, e in enumerate(encodings):
        input_ids[i, :len(e.ids)] = torch.tensor(e.ids)
        attention_mask[i, :len(e.ids)] = 1
    return input_ids, attention_mask


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the real tokens (N, L, d) -> (N, d), as sentence-transformers' Pooling
    with pooling_mode_mean_tokens (all-MiniLM-L6-v2's 1_Pooling/config.json). Padding never counts."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (N, d) / (N, 1) -> (N, d)


class SentimentClassifier(nn.Module):
    """Pretrained encoder -> mean pooling -> Linear(384, 2). The head is new (PyTorch's default init).

    probe: a linear probe, whose encoder stays in eval mode (no dropout) even while the head trains."""

    def __init__(self, encoder: BertModel, num_classes: int = 2, probe: bool = False):
        super().__init__()
        self.encoder, self.probe = encoder, probe
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)  # (384 -> 2)

    def train(self, mode: bool = True) -> "SentimentClassifier":
        super().train(mode)
        if self.probe:
            self.encoder.eval()
        return self

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding (N, 384), before all-MiniLM-L6-v2's final L2 normalisation (not used here)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, L, 384)
        return mean_pool(hidden, attention_mask)  # (N, 384)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))  # (N, 384) -> (N, 2) logits

"""
A compact transformer encoder that reads an MNIST image as a sequence of 28 rows of 28 pixels, for the
transformer version of the experiment (lora_transformer.ipynb).

Each attention block has separate query, key, value and output projections named q, k, v, o, the paper's
Wq, Wk, Wv, Wo, so that LoRA can target them by name: lora.add_lora(model, r, targets=["q", "v"]).
Pre-norm blocks (LayerNorm before attention and MLP), learned positions, mean pooling over the rows.
"""

import math

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        assert d % heads == 0, f"d={d} must be divisible by heads={heads}"
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        split = lambda t: t.view(B, T, self.heads, d // self.heads).transpose(1, 2)  # (B, T, d) -> (B, h, T, d/h)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)).softmax(-1)  # (B, h, T, T)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)  # (B, h, T, d/h) -> (B, T, d)
        return self.o(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, d_mlp: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, d_mlp), nn.GELU(), nn.Linear(d_mlp, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RowTransformer(nn.Module):
    """(N, 784) pixels -> (N, classes) logits; each of the 28 rows of an image is one token."""

    def __init__(self, d: int = 32, heads: int = 2, layers: int = 2, d_mlp: int = 64, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(28, d)  # a row of 28 pixels -> a token of d features
        self.pos = nn.Parameter(torch.randn(28, d) * 0.02)  # one learned position per row
        self.blocks = nn.Sequential(*(Block(d, heads, d_mlp) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.view(-1, 28, 28)) + self.pos  # (N, 784) -> (N, 28 rows, 28) -> (N, 28, d)
        h = self.norm(self.blocks(h))
        return self.head(h.mean(1))  # mean over rows: (N, 28, d) -> (N, d) -> (N, classes)


# LoRA target sets of the transformer experiment, as add_lora matches names. The classifier head is not among
# them: as in the paper, it is trained in full (freezing a task's head is a classic LoRA mistake).
TARGET_SETS = {"qv": ["q", "v"], "qkvo": ["q", "k", "v", "o"],
               "all": ["embed", "q", "k", "v", "o", "blocks.*.mlp.0", "blocks.*.mlp.2"]}  # every nn.Linear but head

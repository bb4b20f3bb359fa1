"""The models the MNIST experiments adapt, and what a method changes in them: where LoRA goes, what trains."""

import torch.nn as nn

import lora

from ..methods import Method
from . import row_transformer

MODELS = ("mlp", "transformer")  # the values of Config.model
# Each model's target sets: a key of methods.TARGET_SETS -> add_lora's name patterns (None: every nn.Linear).
TARGET_SETS = {"mlp": {"all": None}, "transformer": row_transformer.TARGET_SETS}


def make_mlp(dropout: float = 0.1) -> nn.Sequential:
    """The reference architecture: 784 -> 64 -> 64 -> 5 with ReLU and dropout, 54,725 parameters."""
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(64, 64), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(64, 5))


def make_model(name: str, dropout: float) -> nn.Module:
    """A fresh model: name is Config.model, "mlp" or "transformer"."""
    return make_mlp(dropout) if name == "mlp" else row_transformer.RowTransformer()


def add_adapter(model: nn.Module, method: Method) -> None:
    """LoRA or DoRA as `method` says (its rank on its target set; alpha = r: scaling 1, each rank at its own tuned lr),
    and only what it trains left trainable: the adapters, and the transformer's classifier head in full."""
    is_transformer = isinstance(model, row_transformer.RowTransformer)
    patterns = TARGET_SETS["transformer" if is_transformer else "mlp"][method.target_set]
    lora.add_lora(model, r=method.rank, targets=patterns, use_dora=method.dora)
    lora.mark_only_lora_as_trainable(model)
    if is_transformer:
        model.head.requires_grad_(True)

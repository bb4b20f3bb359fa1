"""The models the MNIST experiments adapt, and what a method changes in them: where LoRA goes, what trains."""

import torch.nn as nn

import lora
import transformer

MODELS = ("mlp", "transformer")
TARGET_SET_NAMES = ("all", "qv", "qkvo")  # every target set of every model, in a fixed order (see Method.dropout_seed)


def make_mlp(dropout: float = 0.1) -> nn.Sequential:
    """The reference architecture: 784 -> 64 -> 64 -> 5 with ReLU and dropout, 54,725 parameters."""
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(64, 64), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(64, 5))


def make_model(model: str, dropout: float) -> nn.Module:
    return make_mlp(dropout) if model == "mlp" else transformer.RowTransformer()


def target_sets(model: str) -> dict[str, list[str] | None]:
    """LoRA target sets as add_lora takes them: the MLP's one set is every nn.Linear (None)."""
    return {"all": None} if model == "mlp" else transformer.TARGET_SETS


def add_adapter(model: nn.Module, method) -> None:
    """LoRA or DoRA as `method` says (its rank on its target set; alpha = r: scaling 1, each rank at its own tuned lr),
    and only what it trains left trainable: the adapters, and the transformer's classifier head in full."""
    is_transformer = isinstance(model, transformer.RowTransformer)
    targets = target_sets("transformer" if is_transformer else "mlp")[method.targets]
    lora.add_lora(model, r=method.rank, targets=targets, use_dora=method.dora)
    lora.mark_only_lora_as_trainable(model)
    if is_transformer:
        model.head.requires_grad_(True)

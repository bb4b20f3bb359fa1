"""What an experiment runs: the `Method`s it compares, the MNIST experiments' frozen `Config`, and the device."""

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

import models

KINDS = ("full", "head", "lora")


@dataclass(frozen=True)
class Method:
    """One way to adapt the pretrained model. Typed fields, not a name parsed back."""
    kind: str                    # "full": every weight trains; "head": only the classifier head (a linear probe);
    #                              "lora": adapters, plus the classifier head where the model has a new one
    rank: int | None = None      # LoRA's r
    targets: str = "all"         # LoRA's target set, a key of models.target_sets(model)
    dora: bool = False           # DoRA (Liu et al., 2024): LoRA plus a trained magnitude per output feature
    # Where an experiment has a single target set its methods are named "lora_r4", not "lora_all_r4".
    show_targets: bool = dataclasses.field(default=True, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "lora") != (self.rank is not None) or (self.dora and self.kind != "lora"):
            raise ValueError(f"a LoRA method needs a rank, and only a LoRA method has a rank or DoRA; got {self!r}")

    @property
    def name(self) -> str:
        """"full", "head", "lora_r4", "lora_qv_r4" or "dora_r4": file names, table rows and learning-rate keys."""
        if self.kind != "lora":
            return self.kind
        prefix = "dora" if self.dora else "lora"
        return f"{prefix}_{self.targets}_r{self.rank}" if self.show_targets else f"{prefix}_r{self.rank}"

    @property
    def dropout_seed(self) -> int:
        """Added to the first seed to seed this method's dropout masks: fixed per method, whatever runs
        before it, and distinct for distinct methods. Full finetuning and LoRA on every layer keep the values
        they always had (1000 and 1000 (1 + r)), so the MLP's committed numbers did not move."""
        if self.kind != "lora":
            return {"full": 1000, "head": 500}[self.kind]
        return 1000 * (1 + self.rank) + 100 * models.TARGET_SET_NAMES.index(self.targets) + 50 * self.dora


@dataclass(frozen=True)
class Config:
    seeds: int = 5                                   # repeats; each seed pretrains its own base model
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # LoRA ranks, as in the reference notebook
    batch_size: int = 128                            # every phase, every method
    pretrain_epochs: int = 5                         # on task A
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 5                         # on task B: the same budget for every method
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # each method's learning rate is one of these
    tune_seeds: int = 2                              # seeds 100, 101, ... choose learning rates on validation
    val_size: int = 5000                             # of the 60k training images, held out for tuning
    split_seed: int = 0                              # the train/validation split, the same for every seed
    dropout: float = 0.1                             # in the MLP, as in the reference architecture
    train_subset: int | None = None                  # keep only the first n training images (quick mode)
    model: str = "mlp"                               # "mlp" (the reference's) or "transformer" (transformer.py)
    target_sets: tuple[str, ...] = ("all",)          # where LoRA goes: keys of models.target_sets(model)
    dora: bool = True                                # DoRA at every rank too, as a second series

    @classmethod
    def transformer(cls) -> "Config":
        """The transformer experiment, sized to run in minutes on 2 CPU cores: 12,000 of the training images."""
        return cls(model="transformer", target_sets=("qv", "qkvo", "all"), ranks=(1, 2, 4, 8), seeds=3,
                   pretrain_epochs=3, finetune_epochs=2, pretrain_lr=3e-3, lr_grid=(1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
                   tune_seeds=2, dropout=0.0, train_subset=12_000, dora=False)

    @classmethod
    def quick(cls, model: str = "mlp") -> "Config":
        """Minutes become seconds: for tests and a first look. Not for conclusions."""
        base = cls.transformer() if model == "transformer" else cls()
        ranks = (1, 4) if model == "mlp" else (2,)
        return dataclasses.replace(base, seeds=2, ranks=ranks, pretrain_epochs=1, finetune_epochs=2,
                                   lr_grid=(1e-3, 1e-2), tune_seeds=1, train_subset=6000)

    @classmethod
    def default(cls, model: str = "mlp") -> "Config":
        return cls.transformer() if model == "transformer" else cls()

    def __post_init__(self):
        for name in ("seeds", "batch_size", "pretrain_epochs", "finetune_epochs", "tune_seeds", "val_size"):
            check_positive_int(name, getattr(self, name))
        check_ranks_and_grid(self.ranks, self.lr_grid)
        if self.train_subset is not None:
            check_positive_int("train_subset", self.train_subset)
        if self.model not in models.MODELS:
            raise ValueError(f"model must be one of {models.MODELS}, got {self.model!r}")
        allowed = tuple(models.target_sets(self.model))
        if not self.target_sets or not set(self.target_sets) <= set(allowed):
            raise ValueError(f"target_sets for the {self.model} must be some of {allowed}, got {self.target_sets!r}")

    @property
    def methods(self) -> list[Method]:
        """Full finetuning, then LoRA at every rank on every target set, then DoRA likewise if cfg.dora."""
        several = len(self.target_sets) > 1
        variants = (False, True) if self.dora else (False,)
        return [Method("full")] + [Method("lora", r, t, dora, show_targets=several)
                                   for dora in variants for t in self.target_sets for r in self.ranks]

    def tuning_fields(self) -> dict:
        return tuning_fields(self)


def tuning_fields(cfg) -> dict:
    """The fields of a config dataclass that a learning-rate choice depends on (all but the number of reported
    seeds), as they come back from JSON (tuples as lists)."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    del d["seeds"]
    return d


def check_positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_ranks_and_grid(ranks: tuple[int, ...], lr_grid: tuple[float, ...]) -> None:
    if not ranks or len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks must be distinct positive ints, got {ranks!r}")
    for r in ranks:
        check_positive_int("each rank", r)
    if not lr_grid or not all(isinstance(x, (int, float)) and 0 < x < math.inf for x in lr_grid):
        raise ValueError(f"lr_grid must be positive numbers, got {lr_grid!r}")


def resolve_device(name: str) -> torch.device:
    """"auto" is CUDA when present, else CPU; anything else must exist on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {name!r} does not exist here (CUDA GPUs: {torch.cuda.device_count()})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device

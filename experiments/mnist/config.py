"""What the MNIST experiments run: one frozen `Config` per experiment (the MLP, the row transformer), quick
variants for the tests, and the `Method`s each compares."""

import dataclasses
from dataclasses import dataclass

from ..methods import Method, check_positive_int, check_ranks_and_grid
from . import models


@dataclass(frozen=True)
class Config:
    seeds: int = 10                                  # repeats; each seed pretrains its own base model
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # LoRA ranks, as in the reference notebook
    batch_size: int = 128                            # every phase, every method
    pretrain_epochs: int = 5                         # on task A
    pretrain_lr: float = 1e-3
    finetune_epochs: int = 5                         # on task B: the same budget for every method
    lr_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)  # where each method's search starts; it grows by half
    #                                                  decades past an end where the best rate lies (protocol.py)
    tune_seeds: int = 5                              # seeds 100, 101, ... choose learning rates on validation
    val_size: int = 5000                             # of the 60k training images, held out for tuning
    split_seed: int = 0                              # the train/validation split, the same for every seed
    dropout: float = 0.1                             # in the MLP, as in the reference architecture
    train_subset: int | None = None                  # keep only the first n training images (quick mode)
    model: str = "mlp"                               # the architecture's name: "mlp" or "transformer" (models.py)
    target_sets: tuple[str, ...] = ("all",)          # where LoRA goes: keys of models.TARGET_SETS[model]
    dora: bool = True                                # DoRA at every rank too, as a second series
    qlora_ranks: tuple[int, ...] = (1, 8, 64)        # LoRA over the NF4-quantized base (QLoRA) at these ranks
    margin: float = 0.005                            # "within ±M": full finetuning errs on 1.7% of the digits
    #                                                  (main 9631bf2); ±0.5 points admits at most 1.3x its errors

    @classmethod
    def transformer(cls) -> "Config":
        """The transformer experiment, sized to run in minutes on 2 CPU cores: 12,000 of the training images, 4
        seeds."""
        return cls(model="transformer", target_sets=("qv", "qkvo", "all"), ranks=(1, 2, 4, 8), seeds=4,
                   pretrain_epochs=3, finetune_epochs=2, pretrain_lr=3e-3, lr_grid=(1e-2, 3e-2, 1e-1),
                   tune_seeds=5, dropout=0.0, train_subset=12_000, dora=False, qlora_ranks=(), margin=0.01)

    @classmethod
    def quick(cls, model: str = "mlp") -> "Config":
        """Minutes become seconds: for tests and a first look. Not for conclusions."""
        base = cls.transformer() if model == "transformer" else cls()
        ranks = (1, 4) if model == "mlp" else (2,)
        return dataclasses.replace(base, seeds=2, ranks=ranks, pretrain_epochs=1, finetune_epochs=2,
                                   lr_grid=(1e-3, 1e-2), tune_seeds=2, train_subset=6000,
                                   qlora_ranks=(1,) if model == "mlp" else ())

    @classmethod
    def default(cls, model: str = "mlp") -> "Config":
        return cls.transformer() if model == "transformer" else cls()

    def __post_init__(self):
        if self.model not in models.MODELS:
            raise ValueError(f"model must be one of {models.MODELS}, got {self.model!r}")
        for name in ("seeds", "batch_size", "pretrain_epochs", "finetune_epochs", "tune_seeds", "val_size"):
            check_positive_int(name, getattr(self, name))
        check_ranks_and_grid(self.ranks, self.lr_grid)
        if not set(self.qlora_ranks) <= set(self.ranks) or (self.qlora_ranks and self.model != "mlp"):
            raise ValueError(f"qlora_ranks must be some of ranks {self.ranks}, on the MLP; got {self.qlora_ranks!r}")
        if not 0 < self.margin < 1:
            raise ValueError(f"margin must be a share of accuracy in (0, 1), got {self.margin!r}")
        if self.train_subset is not None:
            check_positive_int("train_subset", self.train_subset)
        allowed = tuple(models.TARGET_SETS[self.model])
        if not self.target_sets or not set(self.target_sets) <= set(allowed):
            raise ValueError(f"target_sets for the {self.model} must be some of {allowed}, got {self.target_sets!r}")

    @property
    def methods(self) -> list[Method]:
        """Full finetuning, then LoRA at every rank on every target set, then DoRA likewise if cfg.dora, then
        QLoRA at qlora_ranks."""
        several = len(self.target_sets) > 1
        variants = (False, True) if self.dora else (False,)
        return ([Method("full")] + [Method("lora", r, t, dora, show_target_set=several)
                                    for dora in variants for t in self.target_sets for r in self.ranks]
                + [Method("lora", r, t, nf4=True, show_target_set=several) for t in self.target_sets
                   for r in self.qlora_ranks])

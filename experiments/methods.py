"""Methods as data: what a run adapts (a `Method`), the target-set keys every experiment shares, and the checks
that configs and the command line make on their arguments."""

import math
from dataclasses import dataclass, field

import torch

KINDS = ("full", "head", "lora")
# Every target-set key of every experiment, in a fixed order: a method's dropout stream depends on its position,
# so a new key goes at the end. Each experiment maps a key to add_lora's name patterns for its own model.
TARGET_SETS = ("all", "qv", "qkvo")
TARGET_SET_LABELS = {"all": "every nn.Linear", "qv": "Wq, Wv", "qkvo": "Wq, Wk, Wv, Wo"}  # in tables and figures


@dataclass(frozen=True)
class Method:
    """One way to adapt the pretrained model. Typed fields, not a name parsed back."""
    kind: str                    # "full": every weight trains; "head": only the classifier head (a linear probe);
    #                              "lora": adapters, plus the classifier head where the model has a new one
    rank: int | None = None      # LoRA's r
    target_set: str = "all"      # where LoRA goes: a key of TARGET_SETS
    dora: bool = False           # DoRA (Liu et al., 2024): LoRA plus a trained magnitude per output feature
    nf4: bool = False            # QLoRA (Dettmers et al., 2023): the frozen base's linear layers stored in 4-bit NF4
    # Where an experiment has a single target set its methods are named "lora_r4", not "lora_all_r4".
    show_target_set: bool = field(default=True, compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "lora") != (self.rank is not None) or ((self.dora or self.nf4) and self.kind != "lora"):
            raise ValueError(f"a LoRA method needs a rank, and only a LoRA method has a rank or DoRA (or an NF4 "
                             f"base); got {self!r}")
        if self.target_set not in TARGET_SETS:
            raise ValueError(f"target_set must be one of {TARGET_SETS}, got {self.target_set!r}")

    @property
    def name(self) -> str:
        """"full", "head", "lora_r4", "lora_qv_r4", "dora_r4" or "qlora_qv_r8": file names, table rows and
        learning-rate keys."""
        if self.kind != "lora":
            return self.kind
        prefix = "dora" if self.dora else "qlora" if self.nf4 else "lora"
        return f"{prefix}_{self.target_set}_r{self.rank}" if self.show_target_set else f"{prefix}_r{self.rank}"

    @property
    def cost_rank(self) -> tuple:
        """Orders methods from cheap to dear to train, roughly: the head, LoRA by rank (DoRA after LoRA at a
        rank), full finetuning. Only the order in which parallel jobs start depends on it, never a number."""
        return ({"head": 0, "lora": 1, "full": 2}[self.kind], self.rank or 0, self.dora)

    @property
    def dropout_seed(self) -> int:
        """Added to the first seed to seed this method's dropout masks: fixed per method, whatever runs before
        it, and distinct for distinct methods."""
        if self.kind != "lora":
            return {"full": 1000, "head": 500}[self.kind]
        return 1000 * (1 + self.rank) + 100 * TARGET_SETS.index(self.target_set) + 50 * self.dora + 25 * self.nf4


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

"""What the text experiment runs: MiniLM-L6 adapted to drug-review sentiment, one frozen config."""

from dataclasses import dataclass

from ..methods import Method, check_positive_int, check_ranks_and_grid


@dataclass(frozen=True)
class TextConfig:
    seeds: int = 5                                   # seeds 0.. for the reported numbers, paired across methods
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)        # LoRA on Wq, Wv (the paper's recipe) at these ranks
    wide_rank: int = 8                               # LoRA on Wq, Wk, Wv, Wo and on every nn.Linear, at this rank
    epochs: int = 16                                 # the same budget for every method: 16 x 13 = 208 steps
    batch_size: int = 32
    max_len: int = 256                               # tokens per review with [CLS] and [SEP]: truncates 2 of 889
    lr_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # each method's lr is one
    tune_seeds: int = 2                              # seeds 100, 101, ... choose learning rates on validation
    val_fraction: float = 0.2                        # of the training reviews, held out for tuning
    split_seed: int = 0                              # the train/validation split, the same for every seed
    train_subset: int | None = None                  # keep only n training and n validation reviews (quick mode)
    test_subset: int | None = None                   # keep only the first n test reviews (quick mode)
    amp: bool = True                                 # bf16 autocast on CUDA (weights and Adam stay float32)

    @classmethod
    def quick(cls) -> "TextConfig":
        """Seconds on a CPU, every method and every file: for the tests. Not for conclusions."""
        return cls(seeds=2, ranks=(1, 2), wide_rank=2, epochs=1, batch_size=4, max_len=16, lr_grid=(1e-3, 1e-2),
                   tune_seeds=1, train_subset=16, test_subset=12)

    def __post_init__(self):
        for name in ("seeds", "wide_rank", "epochs", "batch_size", "tune_seeds"):
            check_positive_int(name, getattr(self, name))
        check_ranks_and_grid(self.ranks, self.lr_grid)
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or not 3 <= self.max_len <= 512:
            raise ValueError(f"max_len must be an int in [3, 512] (MiniLM's positions), got {self.max_len!r}")
        if not isinstance(self.val_fraction, float) or not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be a float in (0, 1), got {self.val_fraction!r}")
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))

    @property
    def methods(self) -> list[Method]:
        """The linear probe, full finetuning, LoRA on Wq, Wv at every rank, then the two wider target sets."""
        return ([Method("head"), Method("full")] + [Method("lora", r, "qv") for r in self.ranks]
                + [Method("lora", self.wide_rank, t) for t in ("qkvo", "all")])

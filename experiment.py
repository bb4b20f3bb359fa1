"""
The experiment: pretrain a small MLP on MNIST digits 0-4 (task A), then adapt it to digits 5-9 (task B,
relabelled 0-4, same 5-way head) by full finetuning and by LoRA at several ranks. Every method gets the same
budget; each method's learning rate is chosen on a validation split; every number is a mean over seeds.

    python experiment.py tune                  # learning rates on validation -> lr_search.csv, learning_rates.json
    python experiment.py sweep --seeds 5       # the sweep -> results.csv, results_per_seed.csv, config.json, PNG
    python experiment.py readme                # the table of results.csv -> README.md
    python experiment.py tune --model transformer   # the same for the transformer of transformer.py

The seeds of one method train together as one stacked model: torch.func.vmap over functional_call, with
parameters of shape (seeds, ...). Adam is elementwise and the losses of different seeds do not interact, so
this is exactly len(seeds) separate trainings, done in one pass per batch instead of one pass per seed.
"""

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import transformer
from storage import atomic_write

ROOT = Path(__file__).resolve().parent
MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics
# The reference notebook's published table (github.com/sunildkumar/lora_from_scratch): trainable parameters and
# test accuracy. Its "full finetune" was trained and tested on digits 0-4 by a bug; LoRA got ~150x more steps.
REFERENCE = {"full": (54_700, 0.984), 1: (1_045, 0.8747), 2: (2_090, 0.9315), 4: (4_180, 0.9640),
             8: (8_360, 0.9710), 16: (16_720, 0.9765), 32: (33_440, 0.9796), 64: (66_880, 0.9805)}


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
    target_sets: tuple[str, ...] = ("all",)          # where LoRA goes: keys of transformer.TARGET_SETS

    @classmethod
    def transformer(cls) -> "Config":
        """The transformer experiment, sized to run in minutes on 2 CPU cores: 12,000 of the training images."""
        return cls(model="transformer", target_sets=("qv", "qkvo", "all"), ranks=(1, 2, 4, 8), seeds=3,
                   pretrain_epochs=3, finetune_epochs=2, pretrain_lr=3e-3, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1),
                   tune_seeds=1, dropout=0.0, train_subset=12_000)

    @classmethod
    def quick(cls, model: str = "mlp") -> "Config":
        """Minutes become seconds: for tests and a first look. Not for conclusions."""
        base = cls.transformer() if model == "transformer" else cls()
        ranks = (1, 8) if model == "mlp" else (2,)
        return dataclasses.replace(base, seeds=2, ranks=ranks, pretrain_epochs=1, finetune_epochs=2,
                                   lr_grid=(1e-3, 1e-2), tune_seeds=1, train_subset=6000)

    def __post_init__(self):
        def positive_int(name, v):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("seeds", "batch_size", "pretrain_epochs", "finetune_epochs", "tune_seeds", "val_size"):
            positive_int(name, getattr(self, name))
        if not self.ranks or len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ranks must be distinct positive ints, got {self.ranks!r}")
        for r in self.ranks:
            positive_int("each rank", r)
        if not self.lr_grid or not all(isinstance(x, (int, float)) and 0 < x < math.inf for x in self.lr_grid):
            raise ValueError(f"lr_grid must be positive numbers, got {self.lr_grid!r}")
        if self.train_subset is not None:
            positive_int("train_subset", self.train_subset)
        if self.model not in ("mlp", "transformer"):
            raise ValueError(f"model must be 'mlp' or 'transformer', got {self.model!r}")
        allowed = ("all",) if self.model == "mlp" else tuple(transformer.TARGET_SETS)
        if not self.target_sets or not set(self.target_sets) <= set(allowed):
            raise ValueError(f"target_sets for the {self.model} must be some of {allowed}, got {self.target_sets!r}")

    @property
    def methods(self) -> list[str]:
        """"full", then "lora_r{r}" (LoRA on every nn.Linear) or "lora_{target set}_r{r}"."""
        name = lambda t, r: f"lora_r{r}" if self.target_sets == ("all",) else f"lora_{t}_r{r}"
        return ["full"] + [name(t, r) for t in self.target_sets for r in self.ranks]

    @property
    def suffix(self) -> str:
        """Output files of the transformer experiment end in _transformer; the MLP's have no suffix."""
        return "" if self.model == "mlp" else "_transformer"

    @property
    def figure(self) -> str:
        return "parameters_vs_accuracy.png" if self.model == "mlp" else "transformer_parameters_vs_accuracy.png"


def method_rank(method: str) -> int | None:
    return None if method == "full" else int(method.rsplit("_r", 1)[1])


def method_targets(method: str) -> str | None:
    """The target set of a LoRA method ("all" when its name has none), None for full finetuning."""
    if method == "full":
        return None
    parts = method.split("_")  # lora_r4 or lora_qv_r4
    return parts[1] if len(parts) == 3 else "all"


# --- data ------------------------------------------------------------------------------------------------

def load_tasks(cfg: Config, device: torch.device) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{"A"|"B": {"train"|"val"|"test": (x (N, 784) float32, y (N,) int64)}}, resident on `device`.

    Task A = digits 0-4, task B = digits 5-9 relabelled y-5. Normalised with MNIST's mean and std.
    """
    from torchvision.datasets import MNIST
    import data

    root = data.prepare_mnist()
    train, test = MNIST(root, train=True), MNIST(root, train=False)
    perm = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = perm[:cfg.val_size], perm[cfg.val_size:]
    if cfg.train_subset is not None:
        train_idx = train_idx[:cfg.train_subset]
    splits = {"train": (train.data[train_idx], train.targets[train_idx]),
              "val": (train.data[val_idx], train.targets[val_idx]),
              "test": (test.data, test.targets)}
    tasks = {"A": {}, "B": {}}
    for name, (images, labels) in splits.items():
        x = ((images.float() / 255 - MEAN) / STD).flatten(1)  # (N, 28, 28) uint8 -> (N, 784)
        for task, lo in (("A", 0), ("B", 5)):
            keep = (labels >= lo) & (labels < lo + 5)
            tasks[task][name] = (x[keep].to(device), (labels[keep] - lo).to(device))
    return tasks


# --- model -----------------------------------------------------------------------------------------------

def make_mlp(dropout: float = 0.1) -> nn.Sequential:
    """The reference architecture: 784 -> 64 -> 64 -> 5 with ReLU and dropout, 54,725 parameters."""
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(64, 64), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(64, 5))


def make_model(cfg: Config) -> nn.Module:
    return make_mlp(cfg.dropout) if cfg.model == "mlp" else transformer.RowTransformer()


def add_adapter(model: nn.Module, method: str) -> None:
    """LoRA as `method` says (its rank, on its target set; alpha = r: scaling 1, each rank at its own tuned lr),
    and only what it trains left trainable: the adapters, and the transformer's classifier head in full."""
    targets = transformer.TARGET_SETS[method_targets(method)] if isinstance(model, transformer.RowTransformer) else None
    lora.add_lora(model, r=method_rank(method), targets=targets)
    lora.mark_only_lora_as_trainable(model)
    if isinstance(model, transformer.RowTransformer):
        model.head.requires_grad_(True)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def stack(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict of (seeds, ...) tensors from one state dict per seed."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def forward(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run every seed's copy of `model`: params (S, ...) each, x (S, B, 784) per seed or (B, 784) shared.

    Returns logits (S, B, 5). Dropout draws independent masks for each seed.
    """
    call = lambda p, x: torch.func.functional_call(model, p, (x,))
    return torch.vmap(call, in_dims=(0, 0 if x.dim() == 3 else None), randomness="different")(params, x)


@torch.no_grad()
def accuracy(model: nn.Module, params: dict[str, torch.Tensor], split: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
    """Accuracy of each seed's model on (x, y), in eval mode."""
    x, y = split
    was_training = model.training
    model.eval()
    correct = (forward(model, params, x).argmax(-1) == y).float().mean(-1)  # (S, N) -> (S,)
    model.train(was_training)
    return correct.tolist()


def fit(model: nn.Module, params: dict[str, torch.Tensor], split: tuple[torch.Tensor, torch.Tensor],
        seeds: list[int], lr: float, epochs: int, batch_size: int) -> list[float]:
    """Train the parameters that require grad in place with Adam and a cosine schedule; returns the mean
    training loss of each epoch (averaged over seeds).

    Each seed shuffles with its own generator, so every method sees the same data order for a given seed.
    """
    x, y = split
    n, S = len(y), len(seeds)
    steps_per_epoch = n // batch_size  # the last partial batch is dropped
    trainable = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr, fused=True)  # one kernel for all tensors instead of ~10 each
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(y.device)  # (S, N)
        total = torch.zeros((), device=y.device)
        for i in range(steps_per_epoch):
            idx = order[:, i * batch_size:(i + 1) * batch_size]  # (S, B)
            xb = x.index_select(0, idx.flatten()).view(S, batch_size, -1)  # (S, B, 784); 2x faster than x[idx]
            logits = forward(model, params, xb)  # (S, B, 784) -> (S, B, 5)
            # mean over each seed's batch, summed over seeds: each seed gets exactly its own gradient
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten()) * S
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.detach()
        losses.append(total.item() / (steps_per_epoch * S))
    return losses


# --- runs: pretraining, one finetuning method, cached so that an interrupted sweep resumes ------------------

def pretrain(cfg: Config, tasks, seeds: list[int]) -> dict:
    """Train one base model per seed on task A. Returns stacked params and accuracies."""
    states = []
    for s in seeds:
        set_seed(s)
        states.append(make_model(cfg).state_dict())
    device = tasks["A"]["train"][0].device
    params = {k: v.to(device).requires_grad_() for k, v in stack(states).items()}
    model = make_model(cfg)
    set_seed(seeds[0])
    losses = fit(model, params, tasks["A"]["train"], seeds, cfg.pretrain_lr, cfg.pretrain_epochs, cfg.batch_size)
    params = {k: v.detach() for k, v in params.items()}
    return {"params": params, "losses": losses, "acc_A": accuracy(model, params, tasks["A"]["test"]),
            "acc_B": accuracy(model, params, tasks["B"]["test"]),
            "val_acc_A": accuracy(model, params, tasks["A"]["val"])}


def finetune(cfg: Config, tasks, seeds: list[int], base: dict[str, torch.Tensor], method: str, lr: float) -> dict:
    """Adapt every seed's pretrained model to task B with one method; returns per-seed accuracies."""
    r = method_rank(method)
    model = make_model(cfg)
    params = {k: v.clone() for k, v in base.items()}  # every method starts from the pretrained weights
    if r is not None:
        with warnings.catch_warnings():  # r > 5 on the MLP's 5-way head is wanted here, as the reference did
            warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")
            add_adapter(model, method)
            adapters = []
            for s in seeds:  # A's initialisation depends only on the seed, not on how many seeds run together
                set_seed(s)
                with_lora = make_model(cfg)
                add_adapter(with_lora, method)
                adapters.append(lora.lora_state_dict(with_lora))
        device = next(iter(base.values())).device
        params.update({k: v.to(device) for k, v in stack(adapters).items()})
    for name, p in model.named_parameters():  # the template model says what trains
        params[name].requires_grad_(p.requires_grad)
    trainable, total = lora.count_parameters(model)
    set_seed(seeds[0] + 1000 * (1 + (r or 0)))  # dropout stream: fixed per method, independent of run order
    losses = fit(model, params, tasks["B"]["train"], seeds, lr, cfg.finetune_epochs, cfg.batch_size)
    params = {k: v.detach() for k, v in params.items()}
    out = {"method": method, "rank": r, "targets": method_targets(method), "lr": lr,
           "trainable_params": trainable, "total_params": total,
           "losses": losses, "val_acc_B": accuracy(model, params, tasks["B"]["val"]),
           "acc_B": accuracy(model, params, tasks["B"]["test"]),
           "acc_A_after": accuracy(model, params, tasks["A"]["test"])}
    if r is not None and trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n):
        with lora.disable_lora(model):  # only LoRA was trained, so switching it off must give the base back
            out["acc_A_disabled"] = accuracy(model, params, tasks["A"]["test"])
    return out


def run_key(cfg: Config, device: torch.device) -> str:
    """Names the cache folder: the config, the device type and the code that produced the runs."""
    code = b"".join((ROOT / f).read_bytes() for f in ("experiment.py", "lora.py", "transformer.py"))
    blob = json.dumps([dataclasses.asdict(cfg), device.type, hashlib.sha256(code).hexdigest()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached(path: Path, compute: Callable[[], dict]) -> dict:
    """compute(), saved atomically at `path`; loaded instead when it is already there."""
    if path.is_file():
        return torch.load(path, weights_only=True)
    result = compute()
    buf = io.BytesIO()
    torch.save(result, buf)
    atomic_write(path, buf.getvalue())
    return result


def _runs(cfg: Config, device: torch.device, seeds: list[int], jobs: list[tuple[str, float]], cache_dir: Path,
          progress: bool, desc: str, after_each: Callable[[int], None] | None = None) -> tuple[dict, list[dict]]:
    """Pretrain once, then finetune each (method, lr) job; every finished run is cached on disk."""
    from tqdm import tqdm

    folder = Path(cache_dir) / run_key(cfg, device) / f"seeds_{seeds[0]}-{seeds[-1]}"
    tasks = functools.cache(lambda: load_tasks(cfg, device))  # loaded only if some run is not cached yet
    results = []
    with tqdm(total=1 + len(jobs), desc=desc, disable=not progress, file=sys.stdout, mininterval=1) as bar:
        base = cached(folder / "pretrain.pt", lambda: pretrain(cfg, tasks(), seeds))
        bar.update()
        for i, (method, lr) in enumerate(jobs):
            bar.set_postfix_str(f"{method} lr={lr:g}", refresh=False)
            results.append(cached(folder / f"{method}_lr{lr:g}.pt",
                                  lambda: finetune(cfg, tasks(), seeds, base["params"], method, lr)))
            bar.update()
            if after_each is not None:
                after_each(i)
    return base, results


def tune(cfg: Config, device: torch.device, cache_dir: Path = ROOT / "runs", progress: bool = True):
    """Each method at each learning rate of the grid, on seeds 100.., scored on task B's validation split.

    Returns (grid: one row per method and lr, chosen: {method: lr with the best mean validation accuracy}).
    The test split is never looked at here.
    """
    import pandas as pd

    seeds = [100 + i for i in range(cfg.tune_seeds)]
    jobs = [(m, lr) for m in cfg.methods for lr in cfg.lr_grid]
    _, results = _runs(cfg, device, seeds, jobs, cache_dir, progress, "tune")
    grid = pd.DataFrame([{"method": r["method"], "lr": r["lr"], "val_acc_B_mean": sum(r["val_acc_B"]) / len(seeds),
                          "val_acc_B": " ".join(f"{a:.4f}" for a in r["val_acc_B"])} for r in results])
    best = grid.loc[grid.groupby("method", sort=False)["val_acc_B_mean"].idxmax()]  # first (smallest lr) on ties
    return grid, dict(zip(best["method"], best["lr"]))


def run_sweep(cfg: Config, lrs: dict[str, float], device: torch.device, cache_dir: Path = ROOT / "runs",
              progress: bool = True, after_each: Callable[[int], None] | None = None):
    """Every method on seeds 0..cfg.seeds-1 at its chosen lr. Returns a DataFrame, one row per method and seed."""
    import pandas as pd

    missing = [m for m in cfg.methods if m not in lrs]
    if missing:
        raise ValueError(f"no learning rate for {missing}: run `python experiment.py tune --model {cfg.model}` first")
    seeds = list(range(cfg.seeds))
    jobs = [(m, lrs[m]) for m in cfg.methods]
    base, results = _runs(cfg, device, seeds, jobs, cache_dir, progress, "sweep", after_each)
    rows = []
    for r in results:
        for i, s in enumerate(seeds):
            rows.append({"method": r["method"], "rank": r["rank"], "targets": r["targets"], "alpha": r["rank"],
                         "seed": s, "lr": r["lr"],
                         "trainable_params": r["trainable_params"], "acc_B": r["acc_B"][i],
                         "acc_A_after": r["acc_A_after"][i], "acc_A_disabled": r.get("acc_A_disabled", [None] * len(seeds))[i],
                         "acc_A_pretrained": base["acc_A"][i], "acc_B_pretrained": base["acc_B"][i],
                         "loss_first_epoch": r["losses"][0], "loss_last_epoch": r["losses"][-1]})
    return pd.DataFrame(rows).astype({"rank": "Int64", "alpha": "Int64"})


def summarize(per_seed, cfg: Config):
    """One row per method: mean and std over seeds, and parameters and accuracy relative to full finetuning."""
    g = per_seed.groupby("method", sort=False)
    out = g.agg(rank=("rank", "first"), targets=("targets", "first"), alpha=("alpha", "first"),
                trainable_params=("trainable_params", "first"),
                acc_B_mean=("acc_B", "mean"), acc_B_std=("acc_B", "std"), acc_A_after_mean=("acc_A_after", "mean"),
                seeds=("seed", "count"), lr=("lr", "first")).reset_index()
    full = out.set_index("method").loc["full"]
    out["pct_params_vs_full"] = 100 * out["trainable_params"] / full["trainable_params"]
    out["pct_acc_vs_full"] = 100 * out["acc_B_mean"] / full["acc_B_mean"]
    out["epochs"], out["batch_size"] = cfg.finetune_epochs, cfg.batch_size
    return out[["method", "rank", "targets", "alpha", "trainable_params", "pct_params_vs_full", "acc_B_mean",
                "acc_B_std", "pct_acc_vs_full", "acc_A_after_mean", "seeds", "epochs", "batch_size", "lr"]]


TARGET_LABELS = {"all": "every nn.Linear", "qv": "Wq, Wv", "qkvo": "Wq, Wk, Wv, Wo"}  # + the head, for the transformer


def plot(results, cfg: Config):
    """Trainable parameters (log x) against test accuracy on task B, one LoRA line per target set, full
    finetuning as a band, and for the MLP the reference notebook's table; returns the matplotlib Figure."""
    reference = REFERENCE if cfg.model == "mlp" else None
    title = "MLP 784-64-64-5" if cfg.model == "mlp" else "Row transformer (transformer.py)"
    import matplotlib.ticker
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no second copy shown in notebooks

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    full = results.set_index("method").loc["full"]
    lo, hi = full["acc_B_mean"] - full["acc_B_std"], full["acc_B_mean"] + full["acc_B_std"]
    ax.axhspan(lo, hi, color="tab:green", alpha=0.2, lw=0)
    ax.axhline(full["acc_B_mean"], color="tab:green", lw=1.5,
               label=f"full finetuning, {int(full['trainable_params']):,} params (mean ± std)")
    lora_rows = results[results["method"] != "full"]
    # Target sets can share a parameter count: each series is nudged sideways (x 0.95, 1, 1.05), its labels too.
    styles = iter([("tab:blue", 1.0, (6, -12), "left"), ("tab:orange", 0.95, (-6, 6), "right"),
                   ("tab:purple", 1.05, (6, 6), "left")])
    for targets, rows in lora_rows.groupby("targets", sort=False):
        color, nudge, offset, align = next(styles)
        x = rows["trainable_params"] * nudge
        ax.errorbar(x, rows["acc_B_mean"], yerr=rows["acc_B_std"], fmt="o-", color=color, capsize=3,
                    label=f"LoRA on {TARGET_LABELS[targets]} ({int(full['seeds'])} seeds, equal budget)")
        for xi, (_, row) in zip(x, rows.iterrows()):
            ax.annotate(f"r={row['rank']}", (xi, row["acc_B_mean"]), textcoords="offset points", xytext=offset,
                        ha=align, fontsize=8, color=color)
    if reference is not None:
        ref_r = [r for r in reference if r != "full"]
        ax.plot([reference[r][0] for r in ref_r], [reference[r][1] for r in ref_r], "s--", color="tab:gray",
                mfc="none", label="LoRA, reference notebook (1 seed, ~150x more steps)")
        ax.plot(*reference["full"], "x", color="tab:red", ms=9, mew=2,
                label="full finetune, reference notebook (trained and tested on 0-4 by a bug)")
    ax.set_xscale("log")
    ax.margins(x=0.08)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    leading = lambda v: round(v / 10 ** math.floor(math.log10(v)))  # 2 for 2,000, 5 for 500, ...
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:,.0f}" if v > 0 and leading(v) in (2, 5) else ""))  # 2x and 5x ticks only
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy on digits 5-9 (task B)")
    ax.set_title(f"{title}, MNIST 0-4 → 5-9: LoRA against full finetuning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# --- files -----------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    import numpy, pandas
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pandas": pandas.__version__, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu_threads": torch.get_num_threads()}


def save_learning_rates(out_dir: Path, cfg: Config, grid, chosen: dict[str, float]) -> None:
    atomic_write(Path(out_dir) / f"lr_search{cfg.suffix}.csv", grid.to_csv(index=False).encode())
    payload = {"config": tune_fields(cfg), "chosen": chosen}
    atomic_write(Path(out_dir) / f"learning_rates{cfg.suffix}.json", (json.dumps(payload, indent=2) + "\n").encode())


def tune_fields(cfg: Config) -> dict:
    """The config fields a learning-rate choice depends on (all but the number of reported seeds)."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as they come back from JSON
    del d["seeds"]
    return d


def load_learning_rates(out_dir: Path, cfg: Config) -> dict[str, float]:
    path = Path(out_dir) / f"learning_rates{cfg.suffix}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python experiment.py tune --model {cfg.model}` first")
    saved = json.loads(path.read_text())
    if saved["config"] != tune_fields(cfg):
        diff = {k: (saved["config"].get(k), v) for k, v in tune_fields(cfg).items() if saved["config"].get(k) != v}
        raise ValueError(f"{path} was tuned for another config (field: (saved, now)): {diff}; "
                         f"run `python experiment.py tune --model {cfg.model}` with this config")
    return saved["chosen"]


def save_results(out_dir: Path, cfg: Config, per_seed, results, fig, device: torch.device, seconds: float) -> None:
    out_dir, sfx = Path(out_dir), cfg.suffix
    atomic_write(out_dir / f"results{sfx}.csv", results.to_csv(index=False, float_format="%.6g").encode())
    atomic_write(out_dir / f"results{sfx}_per_seed.csv", per_seed.to_csv(index=False).encode())  # full precision
    config = {"config": dataclasses.asdict(cfg), "environment": environment(device),
              "sweep_seconds": round(seconds, 1)}
    atomic_write(out_dir / f"config{sfx}.json", (json.dumps(config, indent=2) + "\n").encode())
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out_dir / cfg.figure, buf.getvalue())


def readme_markers(model: str) -> tuple[str, str]:
    """The comments around each generated block of README.md."""
    name, sfx = ("results", "") if model == "mlp" else ("transformer results", "_transformer")
    return (f"<!-- {name}: written by `python experiment.py readme` from results{sfx}.csv and config{sfx}.json -->",
            f"<!-- end of {name} -->")


def load_results(results_dir: Path, cfg: Config):
    import pandas as pd
    return pd.read_csv(Path(results_dir) / f"results{cfg.suffix}.csv").astype({"rank": "Int64", "alpha": "Int64"})


def markdown_table(results, config: dict) -> str:
    """A README results block: the table of a results CSV and what produced it."""
    lines = ["| method | trainable params | % of full's params | test accuracy on 5-9 (mean ± std) | "
             "% of full's accuracy | accuracy on 0-4 after | lr |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    c, env = config["config"], config["environment"]
    for _, r in results.iterrows():
        if r["method"] == "full":
            name = "full finetuning"
        else:
            name = f"LoRA r={r['rank']}" if c["model"] == "mlp" else f"LoRA on {TARGET_LABELS[r['targets']]}, r={r['rank']}"
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['pct_params_vs_full']:.1f} | "
                     f"{r['acc_B_mean']:.4f} ± {r['acc_B_std']:.4f} | {r['pct_acc_vs_full']:.1f} | "
                     f"{r['acc_A_after_mean']:.3f} | {r['lr']:g} |")
    images = "all" if c["train_subset"] is None else f"{c['train_subset']:,} of the"
    lines += ["", f"{c['seeds']} seeds, {images} training images; every method {c['finetune_epochs']} epochs at "
              f"batch size {c['batch_size']} with Adam and a cosine schedule, after {c['pretrain_epochs']} epochs of "
              f"pretraining on 0-4. The sweep took {config['sweep_seconds']:.0f} s on {env['device']} "
              f"({env['device_name']}, {env['cpu_threads']} threads), torch {env['torch']}."]
    return "\n".join(lines)


def update_readme(readme: Path, results_dir: Path, cfg: Config) -> None:
    """Replace the block between readme_markers(cfg.model) with markdown_table of that model's results."""
    start, end = readme_markers(cfg.model)
    config = json.loads((Path(results_dir) / f"config{cfg.suffix}.json").read_text())
    text = readme.read_text()
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{readme} must contain the markers {start!r} and {end!r} once each")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    block = f"{start}\n{markdown_table(load_results(results_dir, cfg), config)}\n{end}"
    atomic_write(readme, (head + block + tail).encode())


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["tune", "sweep", "readme"],
                   help="tune: choose learning rates; sweep: run and report; readme: put results.csv into README.md")
    p.add_argument("--seeds", type=int, help=f"seeds to report (default {Config.seeds})")
    p.add_argument("--ranks", type=int, nargs="+", help=f"LoRA ranks (default {' '.join(map(str, Config.ranks))})")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--model", choices=["mlp", "transformer"], default="mlp", help="which experiment")
    p.add_argument("--quick", action="store_true", help="the tiny config of the tests")
    p.add_argument("--out", type=Path, default=ROOT, help="where results go (default: the repo)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        base = Config.quick(args.model) if args.quick else Config.transformer() if args.model == "transformer" else Config()
        cfg = dataclasses.replace(base, seeds=base.seeds if args.seeds is None else args.seeds,
                                  ranks=base.ranks if args.ranks is None else tuple(args.ranks))
    except ValueError as e:
        p.error(str(e))
    if args.command == "readme":
        update_readme(ROOT / "README.md", args.out, cfg)
        return
    if args.command == "tune":
        grid, chosen = tune(cfg, device)
        save_learning_rates(args.out, cfg, grid, chosen)
        print(grid.to_string(index=False), "\nchosen:", chosen)
        return
    try:
        lrs = load_learning_rates(args.out, cfg)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    start = time.perf_counter()
    per_seed = run_sweep(cfg, lrs, device)
    seconds = time.perf_counter() - start
    results = summarize(per_seed, cfg)
    save_results(args.out, cfg, per_seed, results, plot(results, cfg), device, seconds)
    print(results.to_string(index=False))


if __name__ == "__main__":
    main()

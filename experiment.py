"""
The experiment: pretrain a small MLP on MNIST digits 0-4 (task A), then adapt it to digits 5-9 (task B,
relabelled 0-4, same 5-way head) by full finetuning and by LoRA at several ranks. Every method gets the same
budget; each method's learning rate is chosen on a validation split; every number is a mean over seeds.

    python experiment.py tune                  # learning rates on validation -> lr_search.csv, learning_rates.json
    python experiment.py sweep --seeds 5       # the sweep -> results.csv, results_per_seed.csv, config.json, PNG
    python experiment.py readme                # the table of results.csv -> README.md

The seeds of one method train together as one stacked model: torch.func.vmap over functional_call, with
parameters of shape (seeds, ...). Adam is elementwise and the losses of different seeds do not interact, so
this is exactly len(seeds) separate trainings, done in one pass per batch instead of one pass per seed.
"""

import argparse
import dataclasses
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

    @classmethod
    def quick(cls) -> "Config":
        """Minutes become seconds: for tests and a first look. Not for conclusions."""
        return cls(seeds=2, ranks=(1, 8), pretrain_epochs=1, finetune_epochs=2, lr_grid=(1e-3, 1e-2),
                   tune_seeds=1, train_subset=6000)

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

    @property
    def methods(self) -> list[str]:
        return ["full"] + [f"lora_r{r}" for r in self.ranks]


def method_rank(method: str) -> int | None:
    return None if method == "full" else int(method.removeprefix("lora_r"))


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
        states.append(make_mlp(cfg.dropout).state_dict())
    device = tasks["A"]["train"][0].device
    params = {k: v.to(device).requires_grad_() for k, v in stack(states).items()}
    model = make_mlp(cfg.dropout)
    set_seed(seeds[0])
    losses = fit(model, params, tasks["A"]["train"], seeds, cfg.pretrain_lr, cfg.pretrain_epochs, cfg.batch_size)
    params = {k: v.detach() for k, v in params.items()}
    return {"params": params, "losses": losses, "acc_A": accuracy(model, params, tasks["A"]["test"]),
            "acc_B": accuracy(model, params, tasks["B"]["test"]),
            "val_acc_A": accuracy(model, params, tasks["A"]["val"])}


def finetune(cfg: Config, tasks, seeds: list[int], base: dict[str, torch.Tensor], method: str, lr: float) -> dict:
    """Adapt every seed's pretrained model to task B with one method; returns per-seed accuracies."""
    r = method_rank(method)
    model = make_mlp(cfg.dropout)
    warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")  # r > 5 on the 64 -> 5 head, as the reference did
    if r is None:  # full finetuning: every parameter, starting from the pretrained ones
        params = {k: v.clone().requires_grad_() for k, v in base.items()}
    else:
        lora.add_lora(model, r=r)  # alpha = r: scaling 1, so ranks are compared at their own tuned lr
        lora.mark_only_lora_as_trainable(model)
        adapters = []
        for s in seeds:  # A's initialisation depends only on the seed, not on how many seeds run together
            set_seed(s)
            adapters.append(lora.lora_state_dict(lora_copy(cfg, r)))
        params = {**{k: v.clone() for k, v in base.items()},
                  **{k: v.to(base["0.weight"].device).requires_grad_() for k, v in stack(adapters).items()}}
    trainable, total = lora.count_parameters(model)
    set_seed(seeds[0] + 1000 * (1 + (r or 0)))  # dropout stream: fixed per method, independent of run order
    losses = fit(model, params, tasks["B"]["train"], seeds, lr, cfg.finetune_epochs, cfg.batch_size)
    params = {k: v.detach() for k, v in params.items()}
    out = {"method": method, "rank": r, "lr": lr, "trainable_params": trainable, "total_params": total,
           "losses": losses, "val_acc_B": accuracy(model, params, tasks["B"]["val"]),
           "acc_B": accuracy(model, params, tasks["B"]["test"]),
           "acc_A_after": accuracy(model, params, tasks["A"]["test"])}
    if r is not None:
        with lora.disable_lora(model):
            out["acc_A_disabled"] = accuracy(model, params, tasks["A"]["test"])
    return out


def lora_copy(cfg: Config, r: int) -> nn.Module:
    with_lora = make_mlp(cfg.dropout)
    lora.add_lora(with_lora, r=r)
    return with_lora


def run_key(cfg: Config, device: torch.device) -> str:
    """Names the cache folder: the config, the device type and the code that produced the runs."""
    code = b"".join((ROOT / f).read_bytes() for f in ("experiment.py", "lora.py"))
    blob = json.dumps([dataclasses.asdict(cfg), device.type, hashlib.sha256(code).hexdigest()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: `path` is either old or complete, never torn."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    tasks = load_tasks(cfg, device)
    results = []
    with tqdm(total=1 + len(jobs), desc=desc, disable=not progress, file=sys.stdout, mininterval=1) as bar:
        base = cached(folder / "pretrain.pt", lambda: pretrain(cfg, tasks, seeds))
        bar.update()
        for i, (method, lr) in enumerate(jobs):
            bar.set_postfix_str(f"{method} lr={lr:g}", refresh=False)
            results.append(cached(folder / f"{method}_lr{lr:g}.pt",
                                  lambda: finetune(cfg, tasks, seeds, base["params"], method, lr)))
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
        raise ValueError(f"no learning rate for {missing}: run `python experiment.py tune` first")
    seeds = list(range(cfg.seeds))
    jobs = [(m, lrs[m]) for m in cfg.methods]
    base, results = _runs(cfg, device, seeds, jobs, cache_dir, progress, "sweep", after_each)
    rows = []
    for r in results:
        for i, s in enumerate(seeds):
            rows.append({"method": r["method"], "rank": r["rank"], "alpha": r["rank"], "seed": s, "lr": r["lr"],
                         "trainable_params": r["trainable_params"], "acc_B": r["acc_B"][i],
                         "acc_A_after": r["acc_A_after"][i], "acc_A_disabled": r.get("acc_A_disabled", [None] * len(seeds))[i],
                         "acc_A_pretrained": base["acc_A"][i], "acc_B_pretrained": base["acc_B"][i],
                         "loss_first_epoch": r["losses"][0], "loss_last_epoch": r["losses"][-1]})
    return pd.DataFrame(rows).astype({"rank": "Int64", "alpha": "Int64"})


def summarize(per_seed, cfg: Config):
    """One row per method: mean and std over seeds, and parameters and accuracy relative to full finetuning."""
    g = per_seed.groupby("method", sort=False)
    out = g.agg(rank=("rank", "first"), alpha=("alpha", "first"), trainable_params=("trainable_params", "first"),
                acc_B_mean=("acc_B", "mean"), acc_B_std=("acc_B", "std"), acc_A_after_mean=("acc_A_after", "mean"),
                seeds=("seed", "count"), lr=("lr", "first")).reset_index()
    full = out.set_index("method").loc["full"]
    out.insert(4, "pct_params_vs_full", 100 * out["trainable_params"] / full["trainable_params"])
    out.insert(7, "pct_acc_vs_full", 100 * out["acc_B_mean"] / full["acc_B_mean"])
    out["epochs"], out["batch_size"] = cfg.finetune_epochs, cfg.batch_size
    return out[["method", "rank", "alpha", "trainable_params", "pct_params_vs_full", "acc_B_mean", "acc_B_std",
                "pct_acc_vs_full", "acc_A_after_mean", "seeds", "epochs", "batch_size", "lr"]]


def plot(results, reference: dict = REFERENCE):
    """Trainable parameters (log x) against test accuracy on task B; returns the matplotlib Figure."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no second copy shown in notebooks

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    full = results.set_index("method").loc["full"]
    lo, hi = full["acc_B_mean"] - full["acc_B_std"], full["acc_B_mean"] + full["acc_B_std"]
    ax.axhspan(lo, hi, color="tab:green", alpha=0.2, lw=0)
    ax.axhline(full["acc_B_mean"], color="tab:green", lw=1.5,
               label=f"full finetuning, {int(full['trainable_params']):,} params (mean ± std)")
    ranks = results[results["method"] != "full"]
    ax.errorbar(ranks["trainable_params"], ranks["acc_B_mean"], yerr=ranks["acc_B_std"], fmt="o-",
                color="tab:blue", capsize=3, label=f"LoRA, this repo ({int(full['seeds'])} seeds, equal budget)")
    for _, row in ranks.iterrows():
        ax.annotate(f"r={row['rank']}", (row["trainable_params"], row["acc_B_mean"]), textcoords="offset points",
                    xytext=(6, -12), fontsize=8, color="tab:blue")
    ref_r = [r for r in reference if r != "full"]
    ax.plot([reference[r][0] for r in ref_r], [reference[r][1] for r in ref_r], "s--", color="tab:gray",
            mfc="none", label="LoRA, reference notebook (1 seed, ~150x more steps)")
    ax.plot(*reference["full"], "x", color="tab:red", ms=9, mew=2,
            label="full finetune, reference notebook (trained and tested on 0-4 by a bug)")
    ax.set_xscale("log")
    ax.margins(x=0.08)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy on digits 5-9 (task B)")
    ax.set_title("MNIST 0-4 → 5-9: LoRA rank sweep against full finetuning")
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
    atomic_write(Path(out_dir) / "lr_search.csv", grid.to_csv(index=False).encode())
    payload = {"config": tune_fields(cfg), "chosen": chosen}
    atomic_write(Path(out_dir) / "learning_rates.json", (json.dumps(payload, indent=2) + "\n").encode())


def tune_fields(cfg: Config) -> dict:
    """The config fields a learning-rate choice depends on (all but the number of reported seeds)."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as they come back from JSON
    del d["seeds"]
    return d


def load_learning_rates(out_dir: Path, cfg: Config) -> dict[str, float]:
    path = Path(out_dir) / "learning_rates.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python experiment.py tune` first")
    saved = json.loads(path.read_text())
    if saved["config"] != tune_fields(cfg):
        diff = {k: (saved["config"].get(k), v) for k, v in tune_fields(cfg).items() if saved["config"].get(k) != v}
        raise ValueError(f"{path} was tuned for another config (field: (saved, now)): {diff}; "
                         "run `python experiment.py tune` with this config")
    return saved["chosen"]


def save_results(out_dir: Path, cfg: Config, per_seed, results, fig, device: torch.device, seconds: float) -> None:
    out_dir = Path(out_dir)
    atomic_write(out_dir / "results.csv", results.to_csv(index=False, float_format="%.6g").encode())
    atomic_write(out_dir / "results_per_seed.csv", per_seed.to_csv(index=False).encode())  # full precision
    config = {"config": dataclasses.asdict(cfg), "environment": environment(device),
              "sweep_seconds": round(seconds, 1)}
    atomic_write(out_dir / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(out_dir / "parameters_vs_accuracy.png", buf.getvalue())


README_START = "<!-- results: written by `python experiment.py readme` from results.csv and config.json -->"
README_END = "<!-- end of results -->"


def markdown_table(results, config: dict) -> str:
    """The README's results block: the table of results.csv and what produced it."""
    lines = ["| method | trainable params | % of full's params | test accuracy on 5-9 (mean ± std) | "
             "% of full's accuracy | accuracy on 0-4 after | lr |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for _, r in results.iterrows():
        name = "full finetuning" if r["method"] == "full" else f"LoRA r={r['rank']}"
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['pct_params_vs_full']:.1f} | "
                     f"{r['acc_B_mean']:.4f} ± {r['acc_B_std']:.4f} | {r['pct_acc_vs_full']:.1f} | "
                     f"{r['acc_A_after_mean']:.3f} | {r['lr']:g} |")
    c, env = config["config"], config["environment"]
    lines += ["", f"{c['seeds']} seeds; every method {c['finetune_epochs']} epochs at batch size {c['batch_size']} "
              f"with Adam and a cosine schedule, after {c['pretrain_epochs']} epochs of pretraining on 0-4. "
              f"The sweep took {config['sweep_seconds']:.0f} s on {env['device']} ({env['device_name']}, "
              f"{env['cpu_threads']} threads), torch {env['torch']}."]
    return "\n".join(lines)


def update_readme(readme: Path, results_dir: Path) -> None:
    """Replace the block between README_START and README_END with markdown_table(results.csv)."""
    import pandas as pd

    results = pd.read_csv(results_dir / "results.csv").astype({"rank": "Int64", "alpha": "Int64"})
    config = json.loads((results_dir / "config.json").read_text())
    text = readme.read_text()
    if text.count(README_START) != 1 or text.count(README_END) != 1:
        raise ValueError(f"{readme} must contain the markers {README_START!r} and {README_END!r} once each")
    head, rest = text.split(README_START)
    _, tail = rest.split(README_END)
    block = f"{README_START}\n{markdown_table(results, config)}\n{README_END}"
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
    p.add_argument("--quick", action="store_true", help="the tiny config of the tests")
    p.add_argument("--out", type=Path, default=ROOT, help="where results go (default: the repo)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        base = Config.quick() if args.quick else Config()
        cfg = dataclasses.replace(base, seeds=base.seeds if args.seeds is None else args.seeds,
                                  ranks=base.ranks if args.ranks is None else tuple(args.ranks))
    except ValueError as e:
        p.error(str(e))
    if args.command == "readme":
        update_readme(ROOT / "README.md", args.out)
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
    save_results(args.out, cfg, per_seed, results, plot(results), device, seconds)
    print(results.to_string(index=False))


if __name__ == "__main__":
    main()

"""Runs of an MNIST experiment: pretraining, one finetuning method, the learning-rate search and the sweep.
Every finished run is cached on disk, keyed by the config and the code that can change its numbers, so an
interrupted search or sweep resumes where it stopped."""

import contextlib
import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

import lora
from config import Config, Method
from models import add_adapter, make_model
from storage import cached, fingerprint, with_int_columns
from tasks import load_tasks
from trainer import accuracy, fit, set_seed, stack

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "runs"
# The code whose change can move a trained number; reporting and file writing are not among it.
TRAINING_CODE = ("lora.py", "config.py", "models.py", "transformer.py", "tasks.py", "trainer.py", "runs.py")


def pretrain(cfg: Config, tasks, seeds: list[int]) -> dict:
    """Train one base model per seed on task A. Returns stacked params and accuracies."""
    states = []
    for s in seeds:
        set_seed(s)
        states.append(make_model(cfg.model, cfg.dropout).state_dict())
    device = tasks["A"]["train"][0].device
    params = {k: v.to(device).requires_grad_() for k, v in stack(states).items()}
    model = make_model(cfg.model, cfg.dropout)
    set_seed(seeds[0])
    losses = fit(model, params, tasks["A"]["train"], seeds, [cfg.pretrain_lr] * len(seeds), cfg.pretrain_epochs,
                 cfg.batch_size)
    params = {k: v.detach() for k, v in params.items()}
    return {"params": params, "losses": losses, "acc_A": accuracy(model, params, tasks["A"]["test"]),
            "acc_B": accuracy(model, params, tasks["B"]["test"]),
            "val_acc_A": accuracy(model, params, tasks["A"]["val"])}


@contextlib.contextmanager
def quiet_rank_warning():
    """r > 5 on the MLP's 5-way head is wanted here, as the reference did: silence that warning, here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")
        yield


def initial_adapters(cfg: Config, method: Method, seeds: list[int], base: dict[str, torch.Tensor]) -> dict:
    """Each seed's adapter tensors at initialisation, stacked (S, ...): A drawn from the seed alone (not from how
    many seeds run together), B = 0, and DoRA's magnitude the row norms of that seed's pretrained W."""
    adapters = []
    with quiet_rank_warning():
        for i, s in enumerate(seeds):
            set_seed(s)
            with_lora = make_model(cfg.model, cfg.dropout)
            with_lora.load_state_dict({k: v[i] for k, v in base.items()})
            add_adapter(with_lora, method)
            adapters.append({n: p.detach() for n, p in with_lora.named_parameters()
                             if n.rsplit(".", 1)[-1] in lora.ADAPTER_NAMES})
    device = next(iter(base.values())).device
    return {k: v.to(device) for k, v in stack(adapters).items()}


def finetune(cfg: Config, tasks, seeds: list[int], base: dict[str, torch.Tensor], method: Method,
             lrs: tuple[float, ...]) -> dict:
    """Adapt every seed's pretrained model to task B with one method, at each learning rate of `lrs`: all
    len(lrs) x len(seeds) models train together, model (i, j) at lrs[i] from seed j's base. Returns one list
    per measure, ordered as the models (learning-rate major)."""
    seeds_all = [s for _ in lrs for s in seeds]  # (L * S,): learning-rate major
    base = {k: v.repeat(len(lrs), *[1] * (v.dim() - 1)) for k, v in base.items()}  # (S, ...) -> (L * S, ...)
    model = make_model(cfg.model, cfg.dropout)
    params = {k: v.clone() for k, v in base.items()}  # every method starts from the pretrained weights
    alpha = None
    if method.kind == "lora":
        with quiet_rank_warning():
            add_adapter(model, method)
        params.update(initial_adapters(cfg, method, seeds_all, base))
        (alpha,) = {layer.alpha for _, layer in lora.lora_layers(model)}  # as the layers have it
        alpha = int(alpha) if alpha.is_integer() else alpha
    for name, p in model.named_parameters():  # the template model says what trains
        params[name].requires_grad_(p.requires_grad)
    trainable, total = lora.count_parameters(model)
    set_seed(seeds[0] + method.dropout_seed)
    losses = fit(model, params, tasks["B"]["train"], seeds_all, [lr for lr in lrs for _ in seeds],
                 cfg.finetune_epochs, cfg.batch_size)
    params = {k: v.detach() for k, v in params.items()}
    out = {"method": method.name, "rank": method.rank, "targets": method.targets if method.kind == "lora" else None,
           "dora": method.dora, "alpha": alpha, "lrs": [lr for lr in lrs for _ in seeds], "seeds": seeds_all,
           "trainable_params": trainable, "total_params": total,
           "losses": losses, "val_acc_B": accuracy(model, params, tasks["B"]["val"]),
           "acc_B": accuracy(model, params, tasks["B"]["test"]),
           "acc_A_after": accuracy(model, params, tasks["A"]["test"])}
    if method.kind == "lora" and trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n):
        with lora.disable_lora(model):  # only LoRA was trained, so switching it off must give the base back
            out["acc_A_disabled"] = accuracy(model, params, tasks["A"]["test"])
    return out


def run_key(cfg: Config, device: torch.device) -> str:
    """Names the cache folder: the config, the device type and the code that can change a trained number."""
    return fingerprint([dataclasses.asdict(cfg), device.type], [ROOT / f for f in TRAINING_CODE])


def _runs(cfg: Config, device: torch.device, seeds: list[int], jobs: list[tuple[Method, tuple[float, ...]]],
          cache_dir: Path, progress: bool, desc: str, after_each: Callable[[int], None] | None = None
          ) -> tuple[dict, list[dict]]:
    """Pretrain once, then finetune each (method, learning rates) job; every finished job is cached on disk."""
    folder = Path(cache_dir) / run_key(cfg, device) / f"seeds_{seeds[0]}-{seeds[-1]}"
    tasks = functools.cache(lambda: load_tasks(cfg, device))  # loaded only if some run is not cached yet
    results = []
    with tqdm(total=1 + len(jobs), desc=desc, disable=not progress, file=sys.stdout, mininterval=1) as bar:
        base = cached(folder / "pretrain.pt", lambda: pretrain(cfg, tasks(), seeds))
        bar.update()
        for i, (method, lrs) in enumerate(jobs):
            bar.set_postfix_str(method.name, refresh=False)
            lr_names = "_".join(f"{lr:g}" for lr in lrs)
            results.append(cached(folder / f"{method.name}_lr{lr_names}.pt",
                                  lambda: finetune(cfg, tasks(), seeds, base["params"], method, lrs)))
            bar.update()
            if after_each is not None:
                after_each(i)
    return base, results


def tune(cfg: Config, device: torch.device, cache_dir: Path = CACHE, progress: bool = True):
    """Each method at every learning rate of the grid (all of them trained together), on seeds 100.., scored on
    task B's validation split.

    Returns (grid: one row per method and lr, chosen: {method name: lr with the best mean validation accuracy}).
    The test split is never looked at here.
    """
    seeds = [100 + i for i in range(cfg.tune_seeds)]
    _, results = _runs(cfg, device, seeds, [(m, cfg.lr_grid) for m in cfg.methods], cache_dir, progress, "tune")
    rows = []
    for r in results:
        for i, lr in enumerate(cfg.lr_grid):
            val = r["val_acc_B"][i * len(seeds):(i + 1) * len(seeds)]
            rows.append({"method": r["method"], "lr": lr, "val_acc_B_mean": sum(val) / len(seeds),
                         "val_acc_B": " ".join(f"{a:.4f}" for a in val)})
    grid = pd.DataFrame(rows)
    best = grid.loc[grid.groupby("method", sort=False)["val_acc_B_mean"].idxmax()]  # first (smallest lr) on ties
    chosen = dict(zip(best["method"], best["lr"]))
    edge = {m: lr for m, lr in chosen.items() if len(cfg.lr_grid) > 2 and lr in (min(cfg.lr_grid), max(cfg.lr_grid))}
    if edge:
        warnings.warn(f"learning rates chosen at the edge of the grid {cfg.lr_grid}: {edge}; widen lr_grid",
                      stacklevel=2)
    return grid, chosen


def run_sweep(cfg: Config, lrs: dict[str, float], device: torch.device, cache_dir: Path = CACHE,
              progress: bool = True, after_each: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Every method on seeds 0..cfg.seeds-1 at its chosen lr. Returns a DataFrame, one row per method and seed."""
    missing = [m.name for m in cfg.methods if m.name not in lrs]
    if missing:
        raise ValueError(f"no learning rate for {missing}: run `python experiment.py tune --model {cfg.model}` first")
    seeds = list(range(cfg.seeds))
    jobs = [(m, (lrs[m.name],)) for m in cfg.methods]
    base, results = _runs(cfg, device, seeds, jobs, cache_dir, progress, "sweep", after_each)
    rows = []
    for r in results:
        for i, s in enumerate(seeds):
            rows.append({"method": r["method"], "rank": r["rank"], "targets": r["targets"], "dora": r["dora"],
                         "alpha": r["alpha"],
                         "seed": s, "lr": r["lrs"][i],
                         "trainable_params": r["trainable_params"], "acc_B": r["acc_B"][i],
                         "acc_A_after": r["acc_A_after"][i], "acc_A_disabled": r.get("acc_A_disabled", [None] * len(seeds))[i],
                         "acc_A_pretrained": base["acc_A"][i], "acc_B_pretrained": base["acc_B"][i],
                         "loss_first_epoch": r["losses"][i][0], "loss_last_epoch": r["losses"][i][-1]})
    return with_int_columns(pd.DataFrame(rows))

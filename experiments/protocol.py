"""The protocol every experiment follows, and the run cache it resumes from.

1. tune: every method at every learning rate of cfg.lr_grid on the tuning seeds 100, 101, ..., scored on the
   validation split as counts of correct examples; the test split is never looked at.
2. choose (`choose`): a rate is out where a tuning seed diverged (its last epoch's training loss at chance
   level). Among the rest, the smallest rate whose mean count is within one standard error (over the tuning
   seeds) of the best rate's. Where the best rate is at an end of the grid, the grid grows one step that way and
   the method is tuned again (at most MAX_EXTENSIONS steps each way); only where that bound is hit does a warning
   remain. (A first version also ruled out the rate below a diverged one; it cost accuracy and guarded against
   nothing measured: bench/RESULTS.md, "The selection rule".)
3. sweep: every method at its chosen learning rate on the reported seeds 0 .. cfg.seeds - 1.

An experiment plugs in by subclassing `Experiment`: it says how to train one job (a method at some learning
rates on some seeds) and which of its files can change a trained number. Every finished job is cached on disk
under a key of the config, the device type and those files, so an interrupted search or sweep resumes where it
stopped, and a change of code or config never reuses a stale run.
"""

import abc
import dataclasses
import json
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from . import parallel
from .methods import Method
from .storage import cached, fingerprint, with_int_columns

TUNING_SEED = 100  # tuning seeds are 100, 101, ...: never one of the reported seeds 0, 1, ...
DIVERGED = 0.9      # a run diverged when its last epoch's mean training loss is at least 90% of chance's, ln(classes)
MAX_EXTENSIONS = 2  # steps the grid may grow beyond each of its ends, per method


class Experiment(abc.ABC):
    """One experiment's part of the protocol. Subclasses set the class attributes and implement `train`."""
    name: str                            # "mlp", "transformer", "text": the prefix of its files
    metric: str                          # the per-seed column of test accuracy the summary reports
    val_metric: str                      # the record field tuning scores, measured on the validation split
    per_seed_columns: tuple[str, ...]    # the sweep's columns, in order: record fields
    classes: int                         # of the task: chance's cross-entropy is ln(classes)
    cache: Path                          # the default run-cache folder
    parallel_on_cpu: bool = False        # on the CPU, jobs in processes of one thread each (parallel.py)

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device

    @property
    def methods(self) -> list[Method]:
        return self.cfg.methods

    @abc.abstractmethod
    def code_files(self) -> list[Path]:
        """The files whose change can move a trained number (reporting and file writing are not among them)."""

    def key_extra(self) -> list:
        """Anything besides config, device type and code that a trained number depends on (JSON-able)."""
        return []

    def prepare(self, seeds: list[int], folder: Path):
        """What every job on `seeds` shares (a pretrained base, say), computed once; `folder` caches it."""
        return None

    @abc.abstractmethod
    def train(self, shared, method: Method, lrs: tuple[float, ...], seeds: list[int]) -> list[dict]:
        """Train `method` at each learning rate of `lrs` on each seed: one record per (lr, seed), learning-rate
        major, each with at least "method", "lr", "seed", the field `val_metric`, "val_correct" (the count of
        correct validation examples) and "loss_last_epoch"; on the reported seeds also "test_correct"
        (storage.pack_bits of which test examples it got right)."""

    def tune_command(self) -> str:
        return f"python -m experiments tune --experiment {self.name}"

    # What the command line and the notebooks report; each experiment calls into report.py and figures.py.
    @abc.abstractmethod
    def summarize(self, per_seed: pd.DataFrame) -> pd.DataFrame:
        """report.summarize with this experiment's accuracy column, extra means and budget."""

    @abc.abstractmethod
    def plot(self, results: pd.DataFrame):
        """figures.plot with this experiment's title and lines."""

    @abc.abstractmethod
    def readme_block(self, results: pd.DataFrame, config: dict) -> str:
        """The README's results block: the table and a line on what produced it."""

    def config_extra(self, out, per_seed: pd.DataFrame) -> dict:
        """Fields the config JSON records besides the config, the environment and the sweep's wall time."""
        return {}

    def skip_without_gpu(self, out) -> str | None:
        """Why `make run` skips this experiment on this machine, or None where it runs."""
        return None


def tuning_fields(cfg) -> dict:
    """The fields of a config dataclass that a learning-rate choice depends on (all but the number of reported
    seeds), as they come back from JSON (tuples as lists)."""
    d = json.loads(json.dumps(dataclasses.asdict(cfg)))
    del d["seeds"]
    return d


def run_key(exp: Experiment) -> str:
    """Names the cache folder: the config, the device type, `exp.key_extra()` and the bytes of `exp.code_files()`."""
    return fingerprint([dataclasses.asdict(exp.cfg), exp.device.type, *exp.key_extra()], exp.code_files())


def run_jobs(exp: Experiment, seeds: list[int], jobs: list[tuple[Method, tuple[float, ...]]], cache_dir: Path,
             progress: bool, desc: str, after_each: Callable[[int], None] | None = None,
             workers: int | None = None) -> list[list[dict]]:
    """exp.prepare once, then each (method, learning rates) job on `seeds`; every finished job is cached on disk.

    On the CPU, an experiment with `parallel_on_cpu` runs its jobs `workers` at a time (default: one per core),
    each on one thread (parallel.py); elsewhere one after another, here. after_each(i) follows job i."""
    folder = Path(cache_dir) / run_key(exp) / f"seeds_{seeds[0]}-{seeds[-1]}"
    paths = [folder / f"{method.name}_lr{'_'.join(f'{lr:g}' for lr in lrs)}.pt" for method, lrs in jobs]
    todo = [i for i, path in enumerate(paths) if not path.is_file()]
    in_parallel = exp.parallel_on_cpu and exp.device.type == "cpu"
    results: list = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, disable=not progress, file=sys.stdout, mininterval=1) as bar:
        def done(i: int) -> None:
            bar.set_postfix_str(jobs[i][0].name, refresh=False)
            bar.update()
            if after_each is not None:
                after_each(i)

        for i in (i for i in range(len(jobs)) if i not in todo):
            results[i] = torch.load(paths[i], weights_only=True)["records"]
            done(i)
        if todo and in_parallel:
            with parallel.one_thread():
                shared = exp.prepare(seeds, folder)
            workers = workers or parallel.default_workers()
            if workers > 1:  # long jobs first, so that short ones fill the tail
                todo.sort(key=lambda i: jobs[i][0].cost_rank, reverse=True)
            calls = [(exp, shared, *jobs[i], seeds, paths[i]) for i in todo]
            fresh = parallel.run_each(train_job, calls, workers, lambda k: done(todo[k]))
            for i, records in zip(todo, fresh):
                results[i] = records
        elif todo:
            shared = exp.prepare(seeds, folder)
            for i in todo:
                results[i] = train_job(exp, shared, *jobs[i], seeds, paths[i])
                done(i)
    return results


def train_job(exp: Experiment, shared, method: Method, lrs: tuple[float, ...], seeds: list[int],
              path: Path) -> list[dict]:
    """One job's records, trained and cached at `path` (in whichever process runs it)."""
    return cached(path, lambda: {"records": exp.train(shared, method, lrs, seeds)})["records"]


def diverged(loss_last_epoch, classes: int):
    """Whether a run diverged: its last epoch's mean training loss at chance level (at least DIVERGED x ln(classes),
    the loss of a uniform guess). Works on a float or a pandas Series."""
    return loss_last_epoch >= DIVERGED * math.log(classes)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the rule made of one method's grid."""
    lr: float | None                 # the chosen rate; None where every rate is out
    best: float | None               # the eligible rate with the highest mean count
    out: dict[float, str]            # the rates ruled out, with the reason
    extend: int                      # +1 / -1: the best rate (or, with every rate out, none) sits at the top /
    #                                  bottom of the grid, which should grow that way; 0: inside


def choose(lrs: list[float], correct: list[list[int]], diverged: list[list[bool]]) -> Choice:
    """The selection rule on one method's grid: lrs ascending; correct[i][j] and diverged[i][j] for rate i, seed j.

    A rate is out where any seed diverged. Among the others the best is the highest mean count, the smallest rate
    on an exact tie; the choice is the smallest rate whose mean lies within one standard error of the best (the
    std of the best rate's counts over seeds / sqrt(seeds)): a near tie goes to the smaller, safer rate, whichever
    way rounding splits it."""
    if list(lrs) != sorted(lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"learning rates must be distinct and ascending, got {lrs}")
    n = len(lrs)
    out = {lrs[i]: "diverged" for i in range(n) if any(diverged[i])}
    eligible = [i for i in range(n) if lrs[i] not in out]
    if not eligible:
        return Choice(None, None, out, -1)
    sums = [sum(c) for c in correct]  # equal seed counts: comparing sums is comparing means, in integers
    best = max(eligible, key=lambda i: (sums[i], -i))
    seeds = len(correct[best])
    mean = sums[best] / seeds
    se = math.sqrt(sum((c - mean) ** 2 for c in correct[best]) / (seeds - 1) / seeds) if seeds > 1 else 0.0
    chosen = min(i for i in eligible if sums[i] >= sums[best] - seeds * se)
    return Choice(lrs[chosen], lrs[best], out, 1 if best == n - 1 else -1 if best == 0 else 0)


def beyond(lrs: list[float], direction: int) -> float:
    """The next rate past the top (direction +1) or bottom (-1) of an ascending grid of 3 or more: on a
    half-decade grid (1e-3, 3e-3, 1e-2, ...) the rate two steps in, times (or over) 10; otherwise the end's own
    ratio continued."""
    end, inner, two_in = (lrs[-1], lrs[-2], lrs[-3]) if direction > 0 else (lrs[0], lrs[1], lrs[2])
    if math.isclose(max(end, two_in) / min(end, two_in), 10, rel_tol=0.02):
        lr = inner * 10.0 ** direction
    else:
        lr = end * end / inner
    return float(f"{lr:.12g}")  # 0.3, not 0.30000000000000004


def tune(exp: Experiment, cache_dir: Path | None = None, progress: bool = True,
         workers: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Each method at every learning rate of the grid on the tuning seeds, scored on validation; `choose` picks
    each method's rate, growing its grid where the best rate is at an end (grids of 3 rates or more).

    Returns (grid: one row per method and lr with the mean and each seed's score, the counts, the diverged seeds,
    whether the rate came from growing the grid and what the rule made of it; chosen: {method name: lr}).
    A "seconds" field in the records is summed per row. workers: jobs at a time on the CPU (run_jobs).
    """
    cfg = exp.cfg
    seeds = [TUNING_SEED + i for i in range(cfg.tune_seeds)]
    grids = {m.name: sorted(cfg.lr_grid) for m in exp.methods}
    grown = {(m.name, d): 0 for m in exp.methods for d in (-1, 1)}
    runs = {}  # (method name, lr) -> one record per tuning seed
    jobs = [(m, tuple(cfg.lr_grid)) for m in exp.methods]
    while jobs:
        for (method, lrs), records in zip(jobs, run_jobs(exp, seeds, jobs, cache_dir or exp.cache, progress, "tune",
                                                         workers=workers)):
            for i, lr in enumerate(lrs):
                runs[method.name, lr] = records[i * len(seeds):(i + 1) * len(seeds)]
        jobs = []
        for m in exp.methods:
            c = rule(exp, grids[m.name], runs, m.name)
            if c.extend and len(cfg.lr_grid) > 2 and grown[m.name, c.extend] < MAX_EXTENSIONS:
                grown[m.name, c.extend] += 1
                lr = beyond(grids[m.name], c.extend)
                grids[m.name] = sorted(grids[m.name] + [lr])
                jobs.append((m, (lr,)))
    rows, chosen, bound = [], {}, {}
    for m in exp.methods:
        c = rule(exp, grids[m.name], runs, m.name)
        chosen[m.name] = c.lr if c.lr is not None else grids[m.name][0]
        if c.extend and len(cfg.lr_grid) > 2:
            bound[m.name] = chosen[m.name]
        for lr in grids[m.name]:
            group = runs[m.name, lr]
            scores = [r[exp.val_metric] for r in group]
            row = {"method": m.name, "lr": lr, f"{exp.val_metric}_mean": sum(scores) / len(scores),
                   exp.val_metric: " ".join(f"{a:.4f}" for a in scores),
                   "val_correct": " ".join(str(r["val_correct"]) for r in group),
                   "diverged": sum(bool(diverged(r["loss_last_epoch"], exp.classes)) for r in group),
                   "grown": lr not in cfg.lr_grid,
                   "rule": " ".join(w for w, hit in (("chosen", lr == c.lr), ("best", lr == c.best)) if hit)
                   or c.out.get(lr, "")}
            if "seconds" in group[0]:
                row["seconds"] = sum(r["seconds"] for r in group)
            rows.append(row)
    if bound:
        warnings.warn(f"the best learning rate is still at an end of the grid after {MAX_EXTENSIONS} steps beyond it "
                      f"(or every rate diverged): {bound}", stacklevel=2)
    return pd.DataFrame(rows), chosen


def stuck_at_grid_end(search: pd.DataFrame) -> list[str]:
    """The methods of a saved search (the lr_search CSV) whose best rate, or with every rate out no rate, sits at
    an end of their final grid: growing it stopped at MAX_EXTENSIONS, not at a rate inside."""
    stuck = []
    for method, g in search.groupby("method", sort=False):
        best = g.loc[g["rule"].fillna("").str.contains("best"), "lr"]
        if len(g) > 2 and (best.empty or best.iloc[0] in (g["lr"].min(), g["lr"].max())):
            stuck.append(method)
    return stuck


def rule(exp: Experiment, lrs: list[float], runs: dict, name: str) -> Choice:
    """`choose` on the tuning records of method `name` at the rates `lrs`."""
    groups = [runs[name, lr] for lr in lrs]
    return choose(lrs, [[r["val_correct"] for r in g] for g in groups],
                  [[bool(diverged(r["loss_last_epoch"], exp.classes)) for r in g] for g in groups])


def sweep(exp: Experiment, lrs: dict[str, float], cache_dir: Path | None = None, progress: bool = True,
          after_each: Callable[[int], None] | None = None, workers: int | None = None) -> pd.DataFrame:
    """Every method on seeds 0 .. cfg.seeds - 1 at its chosen lr: one row per method and seed."""
    missing = [m.name for m in exp.methods if m.name not in lrs]
    if missing:
        raise ValueError(f"no learning rate for {missing}: run `{exp.tune_command()}` first")
    jobs = [(m, (lrs[m.name],)) for m in exp.methods]
    results = run_jobs(exp, list(range(exp.cfg.seeds)), jobs, cache_dir or exp.cache, progress, "sweep", after_each,
                       workers)
    rows = [{c: r[c] for c in exp.per_seed_columns} for records in results for r in records]
    return with_int_columns(pd.DataFrame(rows))

"""The protocol every experiment follows, and the run cache it resumes from.

1. tune: every method at every learning rate of cfg.lr_grid on the tuning seeds 100, 101, ..., scored on the
   validation split; the test split is never looked at.
2. choose: per method, the learning rate with the highest mean validation score; on a tie, the smallest of the
   tied learning rates.
3. sweep: every method at its chosen learning rate on the reported seeds 0 .. cfg.seeds - 1.

An experiment plugs in by subclassing `Experiment`: it says how to train one job (a method at some learning
rates on some seeds) and which of its files can change a trained number. Every finished job is cached on disk
under a key of the config, the device type and those files, so an interrupted search or sweep resumes where it
stopped, and a change of code or config never reuses a stale run.
"""

import abc
import dataclasses
import json
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


class Experiment(abc.ABC):
    """One experiment's part of the protocol. Subclasses set the class attributes and implement `train`."""
    name: str                            # "mlp", "transformer", "text": the prefix of its files
    metric: str                          # the per-seed column of test accuracy the summary reports
    val_metric: str                      # the record field tuning scores, measured on the validation split
    per_seed_columns: tuple[str, ...]    # the sweep's columns, in order: record fields
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
        major, each with at least "method", "lr", "seed" and the field `val_metric`."""

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


def choose_learning_rates(grid: pd.DataFrame, score: str) -> dict[str, float]:
    """Per method, the learning rate with the highest mean validation `score`; ties go to the smallest lr."""
    best = grid.sort_values([score, "lr"], ascending=[False, True], kind="stable").drop_duplicates("method")
    chosen = best.set_index("method")["lr"]
    return {m: float(chosen[m]) for m in grid["method"].drop_duplicates()}


def tune(exp: Experiment, cache_dir: Path | None = None, progress: bool = True,
         workers: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Each method at every learning rate of the grid on the tuning seeds, scored on validation.

    Returns (grid: one row per method and lr with the mean and each seed's score, chosen: {method name: lr}).
    A "seconds" field in the records is summed per row. workers: jobs at a time on the CPU (run_jobs).
    """
    cfg = exp.cfg
    seeds = [TUNING_SEED + i for i in range(cfg.tune_seeds)]
    jobs = [(m, tuple(cfg.lr_grid)) for m in exp.methods]
    rows = []
    for records in run_jobs(exp, seeds, jobs, cache_dir or exp.cache, progress, "tune", workers=workers):
        for i, lr in enumerate(cfg.lr_grid):
            group = records[i * len(seeds):(i + 1) * len(seeds)]
            scores = [r[exp.val_metric] for r in group]
            row = {"method": group[0]["method"], "lr": lr, f"{exp.val_metric}_mean": sum(scores) / len(scores),
                   exp.val_metric: " ".join(f"{a:.4f}" for a in scores)}
            if "seconds" in group[0]:
                row["seconds"] = sum(r["seconds"] for r in group)
            rows.append(row)
    grid = pd.DataFrame(rows)
    chosen = choose_learning_rates(grid, f"{exp.val_metric}_mean")
    edge = {m: lr for m, lr in chosen.items() if len(cfg.lr_grid) > 2 and lr in (min(cfg.lr_grid), max(cfg.lr_grid))}
    if edge:
        warnings.warn(f"learning rates chosen at the edge of the grid {cfg.lr_grid}: {edge}; widen lr_grid",
                      stacklevel=2)
    return grid, chosen


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

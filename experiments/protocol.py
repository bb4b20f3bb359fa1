"""The protocol every experiment follows, and the run cache it resumes from.

1. tune: every method at every learning rate of cfg.lr_grid on the tuning seeds 100, 101, ..., scored on the
   validation split as counts of correct examples; the test split is never looked at.
2. choose (`choose`): each rate gets a flag (`flag`): "diverged" where a tuning seed's training loss is not
   finite or ended above where it started, or where the seeds disagree (the worst less than half as far above
   chance as the best); "too slow" where the mean validation accuracy is still near chance. Among the unflagged
   rates the best total count wins, the smaller rate on a tie. Where the runner-up is within one standard error of
   the per-seed difference to the best, it is swept too, as a sensitivity row (a verdict that changes there is
   marked rate-sensitive). The grid grows a step up where the best rate is its top or every rate is too slow,
   down where the best is its bottom or every rate diverged (at most MAX_EXTENSIONS steps each way); only where
   that bound is hit does a warning remain. (Until issue 32 the smallest rate within one standard error of the
   best was chosen: on 3 seeds that step moved choices on validation gaps under 0.25 points.)
3. sweep: every method at its chosen learning rate (and runner-up, where there is one) on the reported seeds
   0 .. cfg.seeds - 1.

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

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import parallel
from .methods import Method
from .storage import cached, fingerprint, with_int_columns

TUNING_SEED = 100  # tuning seeds are 100, 101, ...: never one of the reported seeds 0, 1, ...
TOO_SLOW = 0.1      # a rate is too slow where its mean validation accuracy is within 10% of the way from chance to 1
UNSTABLE = 0.5      # a rate is unstable where its worst tuning seed is less than half as far above chance as its best
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
    def readme_block(self, results: pd.DataFrame, config: dict, runner_up: pd.DataFrame | None = None) -> str:
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
    for k in ("seeds", *REPORT_FIELDS):
        d.pop(k, None)
    return d


REPORT_FIELDS = ("margin",)  # config fields that only reporting reads: they never name a cache folder


def run_key(exp: Experiment) -> str:
    """Names the cache folder: the config (less REPORT_FIELDS), the device type, `exp.key_extra()` and the bytes
    of `exp.code_files()` (the training code, never the reporting or the selection rule: a job's rate is in its
    file name)."""
    cfg = {k: v for k, v in dataclasses.asdict(exp.cfg).items() if k not in REPORT_FIELDS}
    return fingerprint([cfg, exp.device.type, *exp.key_extra()], exp.code_files())


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


def rose(loss_first_epoch, loss_last_epoch):
    """Whether a run diverged: its training loss is not finite, or its last epoch's mean is above its first's.
    Works on floats or pandas Series."""
    first, last = pd.Series(loss_first_epoch, dtype="float64"), pd.Series(loss_last_epoch, dtype="float64")
    bad = ~np.isfinite(last) | ~np.isfinite(first) | (last > first)
    return bool(bad.iloc[0]) if np.ndim(loss_last_epoch) == 0 else bad.to_numpy()


def near_chance(accuracy, classes: int):
    """Whether a validation accuracy (float or array) is within TOO_SLOW of the way from chance (1 / classes) to 1."""
    chance = 1 / classes
    return np.asarray(accuracy) - chance < TOO_SLOW * (1 - chance)


def failed(loss_first_epoch, loss_last_epoch, val_accuracy, classes: int):
    """A reported run that diverged or never learned: it rose (`rose`) or its validation accuracy is near chance.
    Such a run's method gets no verdict. Works on floats or pandas Series."""
    return rose(loss_first_epoch, loss_last_epoch) | near_chance(val_accuracy, classes)


def flag(accuracy: list[float], loss_first: list[float], loss_last: list[float], classes: int) -> str:
    """What the rule makes of one rate from its tuning seeds' validation accuracies and first and last epochs'
    training losses: "diverged" (a seed rose, or the seeds disagree: the worst less than UNSTABLE as far above
    chance as the best), "too slow" (the mean near chance), or "" (eligible)."""
    if any(rose(f, last) for f, last in zip(loss_first, loss_last)):
        return "diverged"
    if near_chance(sum(accuracy) / len(accuracy), classes):
        return "too slow"
    above = [a - 1 / classes for a in accuracy]
    return "diverged" if min(above) < UNSTABLE * max(above) else ""


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the rule made of one method's grid."""
    lr: float | None                 # the chosen rate, the best eligible one; None where every rate is out
    runner_up: float | None          # the next best where it is within the paired noise of the best, else None
    out: dict[float, str]            # the rates ruled out, with the flag
    extend: int                      # +1 / -1: the grid should grow up / down (the best at its top / bottom, or
    #                                  every rate too slow / diverged); 0: it need not


def choose(lrs: list[float], correct: list[list[int]], flags: list[str]) -> Choice:
    """The selection rule on one method's grid: lrs ascending; correct[i][j] the validation count of rate i on
    tuning seed j; flags[i] rate i's `flag`.

    The best is the highest total count among the unflagged rates, the smaller rate on an exact tie (integer
    sums: no rounding decides). The runner-up is the next; it is reported where the mean of its per-seed
    difference to the best is at most one standard error of that difference."""
    if list(lrs) != sorted(lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"learning rates must be distinct and ascending, got {lrs}")
    if not (len(lrs) == len(correct) == len(flags)) or any(f not in ("", "diverged", "too slow") for f in flags):
        raise ValueError(f"one count list and one flag ('', 'diverged' or 'too slow') per rate, got {flags}")
    n = len(lrs)
    out = {lrs[i]: flags[i] for i in range(n) if flags[i]}
    eligible = sorted((i for i in range(n) if not flags[i]), key=lambda i: (-sum(correct[i]), i))
    if not eligible:
        kinds = set(flags)
        return Choice(None, None, out, -1 if kinds == {"diverged"} else 1 if kinds == {"too slow"} else 0)
    best, runner_up = eligible[0], None
    if len(eligible) > 1:
        d = np.subtract(correct[best], correct[eligible[1]], dtype=np.float64)  # per tuning seed
        se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
        if d.mean() <= se:
            runner_up = lrs[eligible[1]]
    return Choice(lrs[best], runner_up, out, 1 if best == n - 1 else -1 if best == 0 else 0)


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
         workers: int | None = None) -> tuple[pd.DataFrame, dict, dict]:
    """Each method at every learning rate of the grid on the tuning seeds, scored on validation; `choose` picks
    each method's rate, growing its grid where it says (grids of 3 rates or more).

    Returns (grid: one row per method and lr with the mean and each seed's score, the counts, the rate's flag,
    whether the rate came from growing the grid and what the rule made of it; chosen: {method name: lr};
    runner_up: {method name: lr} where a near tie is swept too). A "seconds" field in the records is summed per
    row. workers: jobs at a time on the CPU (run_jobs).
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
    rows, chosen, runner_up, bound = [], {}, {}, {}
    for m in exp.methods:
        c = rule(exp, grids[m.name], runs, m.name)
        chosen[m.name] = c.lr if c.lr is not None else grids[m.name][0]
        if c.runner_up is not None:
            runner_up[m.name] = c.runner_up
        if c.extend and len(cfg.lr_grid) > 2:
            bound[m.name] = chosen[m.name]
        for lr in grids[m.name]:
            group = runs[m.name, lr]
            scores = [r[exp.val_metric] for r in group]
            row = {"method": m.name, "lr": lr, f"{exp.val_metric}_mean": sum(scores) / len(scores),
                   exp.val_metric: " ".join(f"{a:.4f}" for a in scores),
                   "val_correct": " ".join(str(r["val_correct"]) for r in group),
                   "total": sum(r["val_correct"] for r in group), "flag": c.out.get(lr, ""),
                   "grown": lr not in cfg.lr_grid,
                   "rule": {c.lr: "chosen", c.runner_up: "runner-up"}.get(lr, c.out.get(lr, ""))}
            if "seconds" in group[0]:
                row["seconds"] = sum(r["seconds"] for r in group)
            rows.append(row)
    if bound:
        warnings.warn(f"the grid still wants to grow after {MAX_EXTENSIONS} steps beyond an end (its best rate "
                      f"is there, or every rate is out): {bound}", stacklevel=2)
    return pd.DataFrame(rows), chosen, runner_up


def stuck_at_grid_end(search: pd.DataFrame) -> list[str]:
    """The methods of a saved search (the lr_search CSV) whose chosen rate, or with every rate out no rate, sits
    at an end of their final grid: growing it stopped at MAX_EXTENSIONS, not at a rate inside."""
    stuck = []
    for method, g in search.groupby("method", sort=False):
        best = g.loc[g["rule"].fillna("") == "chosen", "lr"]
        if len(g) > 2 and (best.empty or best.iloc[0] in (g["lr"].min(), g["lr"].max())):
            stuck.append(method)
    return stuck


def rule(exp: Experiment, lrs: list[float], runs: dict, name: str) -> Choice:
    """`choose` on the tuning records of method `name` at the rates `lrs`."""
    groups = [runs[name, lr] for lr in lrs]
    return choose(lrs, [[r["val_correct"] for r in g] for g in groups], [record_flag(exp, g) for g in groups])


def record_flag(exp: Experiment, group: list[dict]) -> str:
    """`flag` of one rate's tuning records (a record without loss_first_epoch cannot have risen)."""
    return flag([r[exp.val_metric] for r in group], [r.get("loss_first_epoch", r["loss_last_epoch"]) for r in group],
                [r["loss_last_epoch"] for r in group], exp.classes)


def sweep(exp: Experiment, lrs: dict[str, float], cache_dir: Path | None = None, progress: bool = True,
          after_each: Callable[[int], None] | None = None, workers: int | None = None,
          runner_up: dict[str, float] | None = None, seeds: list[int] | None = None) -> pd.DataFrame:
    """Every method on seeds 0 .. cfg.seeds - 1 (or on `seeds`: a replicate on a disjoint set) at its chosen lr,
    and at its runner-up where given (trained in
    the same job): one row per method, rate and seed, the runner-up's marked in a column "runner_up"."""
    missing = [m.name for m in exp.methods if m.name not in lrs]
    if missing:
        raise ValueError(f"no learning rate for {missing}: run `{exp.tune_command()}` first")
    runner_up = runner_up or {}
    jobs = [(m, (lrs[m.name],) + ((runner_up[m.name],) if m.name in runner_up else ())) for m in exp.methods]
    seeds = list(range(exp.cfg.seeds)) if seeds is None else list(seeds)
    if not seeds or min(seeds) < 0 or max(seeds) >= TUNING_SEED:
        raise ValueError(f"reported seeds must lie in 0 .. {TUNING_SEED - 1}, apart from the tuning seeds; got {seeds}")
    results = run_jobs(exp, seeds, jobs, cache_dir or exp.cache, progress, "sweep", after_each,
                       workers)
    rows = [{**{c: r[c] for c in exp.per_seed_columns}, "runner_up": r["lr"] != lrs[r["method"]]}
            for records in results for r in records]
    return with_int_columns(pd.DataFrame(rows))

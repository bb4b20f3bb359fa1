"""The one driver every caller runs an experiment through (the notebooks, the command line, the tests' fixture):
tune -> save the choice -> sweep -> summarize -> plot -> save every file. Running (protocol.py and the
experiment's `train`) stays apart from reporting (`summarize`, `plot`), so that a report edit never throws a
cached run away."""

import dataclasses
import json
import time

import pandas as pd

from . import protocol, report, storage


def tune(exp: protocol.Experiment, out: storage.Outputs, cache_dir=None, progress: bool = True) -> pd.DataFrame:
    """The learning-rate search, saved under `out` (its grid CSV, the chosen and runner-up rates); returns the
    grid."""
    start = time.perf_counter()
    grid, chosen, runner_up = protocol.tune(exp, cache_dir, progress)
    storage.save_learning_rates(out, protocol.tuning_fields(exp.cfg), grid, chosen, time.perf_counter() - start,
                                runner_up)
    return grid


def sweep(exp: protocol.Experiment, out: storage.Outputs, cache_dir=None, progress: bool = True,
          seeds: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep at the rates saved under `out` (FileNotFoundError / ValueError where there are none for this
    config), summarized, plotted and saved; returns (per_seed, results). seeds: the reported seeds where not
    0 .. cfg.seeds - 1 (a replicate on a disjoint set)."""
    chosen, runner_up = storage.load_learning_rates(out, protocol.tuning_fields(exp.cfg), exp.tune_command(),
                                                    with_runner_up=True)
    start = time.perf_counter()
    per_seed = protocol.sweep(exp, chosen, cache_dir, progress, runner_up=runner_up, seeds=seeds)
    seconds = time.perf_counter() - start
    results = exp.summarize(per_seed)
    storage.save_results(out, exp.cfg, per_seed, results, exp.plot(results), exp.device, seconds,
                         exp.config_extra(out, per_seed), report.runner_up_rows(per_seed, exp.summarize))
    return per_seed, results


def run(exp: protocol.Experiment, out: storage.Outputs, cache_dir=None,
        progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """tune, then sweep: (grid, per_seed, results), every file written under `out`."""
    grid = tune(exp, out, cache_dir, progress)
    return (grid, *sweep(exp, out, cache_dir, progress))


def report_again(exp: protocol.Experiment, out: storage.Outputs) -> pd.DataFrame:
    """The summary, runner-up rows and figure recomputed from the per-seed records saved under `out`, without
    training: what a change of the verdicts or of their words needs. The per-seed files and the config stay as
    they are. Returns the summary."""
    if not out.per_seed.is_file():
        raise FileNotFoundError(f"{out.per_seed} does not exist: run the sweep first")
    saved = {k: v for k, v in storage.load_config(out)["config"].items() if k not in protocol.REPORT_FIELDS}
    now = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(exp.cfg))).items() if k not in protocol.REPORT_FIELDS}
    if saved != now:  # the summary states the config's budget: another config's runs would be mislabelled
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        raise ValueError(f"{out.per_seed} was made with another config (field: (saved, now)): {diff}")
    per_seed = storage.load_per_seed(out)
    results = exp.summarize(per_seed)
    storage.save_summary(out, results, exp.plot(results), report.runner_up_rows(per_seed, exp.summarize))
    return results

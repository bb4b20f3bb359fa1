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
    python -m experiments report --experiment mlp   # the summary and figure again from the saved per-seed records
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from . import compare, protocol, report, sentences, storage
from . import run as driver
from .methods import resolve_device
from .mnist.config import Config
from .mnist.experiment import MnistExperiment
from .text import run as text_run
from .text import table as text_table
from .text.config import TASKS, TextConfig
from .text.experiment import TextExperiment

# The registry: an experiment's name -> (its config class's default, its quick config, its Experiment class).
# A new experiment registers here; nothing below names one.
REGISTRY = {
    "mlp": (lambda task: Config.default("mlp"), lambda task: Config.quick("mlp"), MnistExperiment),
    "transformer": (lambda task: Config.default("transformer"), lambda task: Config.quick("transformer"),
                    MnistExperiment),
    "text": (TextConfig.default, TextConfig.quick, TextExperiment),
}
EXPERIMENTS = tuple(REGISTRY)


def make_experiment(name: str, device, quick: bool = False, seeds: int | None = None,
                    ranks: tuple[int, ...] | None = None, task: str = TASKS[0]) -> protocol.Experiment:
    """The experiment called `name` (for text: on `task`) with its default (or quick) config, seeds and ranks
    replaced where given."""
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}: use one of {EXPERIMENTS}")
    default, quick_cfg, cls = REGISTRY[name]
    base = quick_cfg(task) if quick else default(task)
    cfg = dataclasses.replace(base, seeds=base.seeds if seeds is None else seeds,
                              ranks=base.ranks if ranks is None else tuple(ranks))
    return cls(cfg, device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("phase", choices=["tune", "sweep", "report", "readme", "has-gpu", "compare"],
                   help="tune: choose learning rates; sweep: run and report; report: the summary, runner-up rows and"
                        "\nfigure again from the saved per-seed records (no training: after a change of the verdicts"
                        "\nor their words); readme: put the results into README.md; has-gpu: exit 0 where the"
                        "\nexperiment can run; compare: these results against --against")
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
    if args.phase == "report":
        try:
            results = driver.report_again(exp, out)
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        print(results.to_string(index=False))
        return
    if args.phase == "readme":
        results = storage.load_results(out)
        block = exp.readme_block(results, storage.load_config(out), storage.load_results(out, runner_up=True))
        readme = storage.ROOT / "README.md"
        report.replace_readme_block(readme, report.readme_markers(exp.name), block)
        if exp.name == "mlp":  # the first screen: its table and sentences, and how long the runs take
            report.replace_readme_block(readme, report.readme_markers("mlp", "headline"), sentences.headline(results))
            report.replace_readme_block(readme, report.readme_markers("mlp", "time"),
                                        report.run_times(storage.RUN_TIMES))
        return
    if args.phase == "tune":
        grid = driver.tune(exp, out)
        print(grid.to_string(index=False), "\nchosen:", storage.load_learning_rates(
            out, protocol.tuning_fields(exp.cfg), exp.tune_command(), with_runner_up=True))
        return
    try:
        _, results = driver.sweep(exp, out)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(results.to_string(index=False))


if __name__ == "__main__":
    main()

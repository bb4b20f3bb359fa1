"""
The MNIST experiments from the command line: pretrain on digits 0-4 (task A), adapt to digits 5-9 (task B,
relabelled 0-4, same 5-way head) by full finetuning and by LoRA at several ranks, with the same budget for every
method, each method's learning rate chosen on a validation split, every number a mean over seeds.

    python experiment.py tune                  # learning rates on validation -> results/mlp_lr_search.csv, ..._learning_rates.json
    python experiment.py sweep --seeds 5       # the sweep -> results.csv, parameters_vs_accuracy.png, results/mlp_*
    python experiment.py readme                # the table of results.csv -> README.md
    python experiment.py tune --model transformer   # the same for the transformer of transformer.py
"""

import argparse
import dataclasses
import time
from pathlib import Path

import report
import runs
import storage
from config import Config, resolve_device


def tune_command(cfg: Config) -> str:
    return f"python experiment.py tune --model {cfg.model}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["tune", "sweep", "readme"],
                   help="tune: choose learning rates; sweep: run and report; readme: put the results into README.md")
    p.add_argument("--seeds", type=int, help=f"seeds to report (default {Config.seeds})")
    p.add_argument("--ranks", type=int, nargs="+", help=f"LoRA ranks (default {' '.join(map(str, Config.ranks))})")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--model", choices=["mlp", "transformer"], default="mlp", help="which experiment")
    p.add_argument("--quick", action="store_true", help="the tiny config of the tests")
    p.add_argument("--out", type=Path, default=storage.ROOT, help="where results go (default: the repo)")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        base = Config.quick(args.model) if args.quick else Config.default(args.model)
        cfg = dataclasses.replace(base, seeds=base.seeds if args.seeds is None else args.seeds,
                                  ranks=base.ranks if args.ranks is None else tuple(args.ranks))
    except ValueError as e:
        p.error(str(e))
    out = storage.Outputs(args.model, args.out)
    if args.command == "readme":
        report.update_readme(storage.ROOT / "README.md", out)
        return
    if args.command == "tune":
        grid, chosen = runs.tune(cfg, device)
        storage.save_learning_rates(out, cfg.tuning_fields(), grid, chosen)
        print(grid.to_string(index=False), "\nchosen:", chosen)
        return
    try:
        lrs = storage.load_learning_rates(out, cfg.tuning_fields(), tune_command(cfg))
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    start = time.perf_counter()
    per_seed = runs.run_sweep(cfg, lrs, device)
    seconds = time.perf_counter() - start
    results = report.summarize(per_seed, cfg)
    storage.save_results(out, cfg, per_seed, results, report.plot(results, cfg), device, seconds)
    print(results.to_string(index=False))


if __name__ == "__main__":
    main()

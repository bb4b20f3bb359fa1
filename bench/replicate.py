"""A replicate of an MNIST table: the same protocol and learning rates on a disjoint set of seeds, its files kept
under bench/replicates/, and the committed table compared with it verdict by verdict (both columns) in RESULTS.md.

    python bench/replicate.py --experiment mlp --first-seed 10    # seeds 10..19 against the committed 0..9

The learning rates are the committed ones (results/<experiment>_learning_rates.json): the tuning seeds are the
same, so a replicate on new reported seeds is what a re-run on another machine amounts to (a new draw of seeds).
"""

import argparse
import shutil

import torch

from common import ROOT, record  # first: puts the repo on sys.path
from experiments import compare, storage
from experiments import run as driver
from experiments.__main__ import make_experiment


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="mlp", choices=["mlp", "transformer"])
    p.add_argument("--first-seed", type=int, default=10, help="the replicate's seeds start here (default 10)")
    args = p.parse_args()
    exp = make_experiment(args.experiment, torch.device("cpu"))
    seeds = list(range(args.first_seed, args.first_seed + exp.cfg.seeds))
    folder = ROOT / "bench" / "replicates" / f"{args.experiment}_seeds_{seeds[0]}-{seeds[-1]}"
    mine, committed = storage.Outputs(args.experiment, folder), storage.Outputs(args.experiment)
    mine.learning_rates.parent.mkdir(parents=True, exist_ok=True)
    for name in ("learning_rates", "lr_search"):  # the committed choice: the replicate tunes nothing
        shutil.copyfile(getattr(committed, name), getattr(mine, name))
    driver.sweep(exp, mine, ROOT / "runs", progress=False, seeds=seeds)
    text, table = compare.compare(committed, mine)
    record(f"Replicate: {args.experiment} on seeds {seeds[0]}-{seeds[-1]} against the committed seeds "
           f"0-{exp.cfg.seeds - 1}", text + ("\n\n" + compare.markdown(table) if len(table) else ""),
           torch.device("cpu"))


if __name__ == "__main__":
    main()

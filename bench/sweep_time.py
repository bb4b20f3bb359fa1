"""Question 1: wall time of the default sweep end to end (data loading, pretraining, all seeds and methods,
evaluations), or of the learning-rate search (--phase search: every method at every learning rate of the grid on
the tuning seeds), the median of several repetitions, each with an empty run cache.

    python bench/sweep_time.py [--phase sweep|search] [--experiment mlp|transformer] [--device auto|cpu|cuda] [--repeats 3]
"""

import argparse
import tempfile

import pandas as pd

from common import ROOT, default_learning_rates, median, record, table, wall  # first: puts the repo on sys.path
from experiments import protocol, storage
from experiments.methods import resolve_device
from experiments.mnist.config import Config
from experiments.mnist.experiment import MnistExperiment


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phase", choices=("sweep", "search"), default="sweep")
    p.add_argument("--experiment", choices=("mlp", "transformer"), default="mlp")
    args = p.parse_args()
    device = resolve_device(args.device)
    cfg = Config.default(args.experiment)
    lrs = default_learning_rates(cfg)
    times, out = [], {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            if args.phase == "sweep":
                times.append(wall(lambda: out.update(
                    sweep=protocol.sweep(MnistExperiment(cfg, device), lrs, cache, progress=False)), device))
            else:
                times.append(wall(lambda: protocol.tune(MnistExperiment(cfg, device), cache, progress=False), device))
        print(f"{times[-1]:.2f} s")
    body = table(["device", "runs (s)", "median (s)"],
                 [[str(device), ", ".join(f"{t:.2f}" for t in times), f"**{median(times):.2f}**"]])
    seeds = cfg.seeds if args.phase == "sweep" else f"{cfg.tune_seeds} tuning"
    grid = "" if args.phase == "sweep" else f", {len(cfg.lr_grid)} learning rates each"
    body += (f"\n\nDefault {cfg.model} config: {seeds} seeds, {len(cfg.methods)} methods{grid}, {cfg.pretrain_epochs}+"
             f"{cfg.finetune_epochs} epochs at batch size {cfg.batch_size}.")
    if args.phase == "sweep":  # the same table on this device as the committed one, within the seeds' spread?
        committed = pd.read_csv(storage.Outputs(cfg.model, ROOT).summary).set_index("method")
        here = out["sweep"].groupby("method", sort=False)["acc_B"].mean()
        rows = [[m, f"{here[m]:.4f}", f"{committed.acc_B_mean[m]:.4f} ± {committed.acc_B_std[m]:.4f}",
                 f"{(here[m] - committed.acc_B_mean[m]) / committed.acc_B_std[m]:+.2f}"] for m in here.index]
        body += ("\n\nTest accuracy on 5-9, mean of the seeds, here against the committed summary CSV (mean ± std "
                 "over seeds):\n\n" + table(["method", "here", "committed", "difference / std"], rows))
    title = "1. End-to-end sweep wall time" if args.phase == "sweep" else "1b. Learning-rate search wall time"
    record(title, body, device)


if __name__ == "__main__":
    main()

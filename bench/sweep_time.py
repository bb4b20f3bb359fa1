"""Question 1: wall time of the default sweep end to end (data loading, pretraining, all seeds and methods,
evaluations), the median of several repetitions, each with an empty run cache.

    python bench/sweep_time.py [--device auto|cpu|cuda] [--repeats 3]
"""

import argparse
import tempfile

from common import default_learning_rates, median, record, table, wall  # first: puts the repo on sys.path
import runs
from config import Config, resolve_device


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = resolve_device(args.device)
    cfg = Config()
    lrs = default_learning_rates(cfg)
    times = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            times.append(wall(lambda: runs.run_sweep(cfg, lrs, device, cache_dir=cache, progress=False), device))
        print(f"{times[-1]:.2f} s")
    body = table(["device", "runs (s)", "median (s)"],
                 [[str(device), ", ".join(f"{t:.2f}" for t in times), f"**{median(times):.2f}**"]])
    body += (f"\n\nDefault config: {cfg.seeds} seeds, {len(cfg.methods)} methods, {cfg.pretrain_epochs}+"
             f"{cfg.finetune_epochs} epochs at batch size {cfg.batch_size}.")
    record("1. End-to-end sweep wall time", body, device)


if __name__ == "__main__":
    main()

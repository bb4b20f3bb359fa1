"""Two runs' tables side by side, recorded in RESULTS.md: the learning rates each chose, each mean's move in
units of the seed spread, and each verdict (experiments/compare.py does the comparing).

    python bench/compare_runs.py --experiment mlp --old /tmp/gpu --title "CPU against H200"   # another root
    python bench/compare_runs.py --experiment transformer --old 3912c11                      # a git revision

--old is a folder holding another run's results (results.csv, results/...) or a git revision; the new run is the
working tree's files.
"""

import argparse

import torch

from common import record  # first: puts the repo on sys.path
from experiments import compare


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", nargs="+", default=["mlp"], choices=["mlp", "transformer", "text_rotten_tomatoes",
                                                                        "text_imdb"])
    p.add_argument("--old", required=True, help="a folder with another run's results, or a git revision")
    p.add_argument("--title", default=None, help="the RESULTS.md heading (default: the two runs named)")
    args = p.parse_args()
    body = []
    for name in args.experiment:
        text, table = compare.against(name, args.old)
        body.append(text + ("\n\n" + compare.markdown(table) if len(table) else ""))
    record(args.title or f"The committed tables against {args.old}'s", "\n\n".join(body), torch.device("cpu"))


if __name__ == "__main__":
    main()

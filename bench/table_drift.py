"""Question 7: how far a regenerated table moved from an earlier one. Each method's mean test accuracy in the
committed summary now and at a git revision, the difference in units of the earlier run's standard deviation
over seeds, and the learning rate each run chose.

    python bench/table_drift.py --against 3912c11 [--experiment mlp transformer]

A faster path that sums in another order, or draws other dropout masks, should move every mean by about the
seed spread or less; a learning rate chosen one grid step apart can move a method further.
"""

import argparse
import io
import subprocess

import pandas as pd
import torch

from common import ROOT, record, table  # first: puts the repo on sys.path
from experiments import storage


def at_revision(path, rev: str) -> pd.DataFrame:
    relative = path.relative_to(ROOT).as_posix()
    text = subprocess.run(["git", "show", f"{rev}:{relative}"], cwd=ROOT, check=True, capture_output=True, text=True)
    return pd.read_csv(io.StringIO(text.stdout))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--against", required=True, help="a git revision whose committed tables to compare with")
    p.add_argument("--experiment", nargs="+", default=["mlp", "transformer"], choices=["mlp", "transformer"])
    args = p.parse_args()
    body = []
    for name in args.experiment:
        path = storage.Outputs(name).summary
        old, new = at_revision(path, args.against).set_index("method"), pd.read_csv(path).set_index("method")
        rows = []
        for m in new.index:
            d = (new.acc_B_mean[m] - old.acc_B_mean[m]) / old.acc_B_std[m]
            rows.append([m, f"{old.acc_B_mean[m]:.4f} ± {old.acc_B_std[m]:.4f}", f"{old.lr[m]:g}",
                         f"{new.acc_B_mean[m]:.4f} ± {new.acc_B_std[m]:.4f}", f"{new.lr[m]:g}", f"{d:+.2f}"])
        within = sum(abs(float(r[-1])) <= 1 for r in rows)
        body.append(f"**{name}**: {within} of {len(rows)} means within one of {args.against}'s standard deviations.\n\n"
                    + table(["method", f"{args.against} (mean ± std)", "lr", "now (mean ± std)", "lr",
                             "difference / std"], rows))
    record(f"7. The committed tables against {args.against}'s", "\n\n".join(body), torch.device("cpu"))


if __name__ == "__main__":
    main()

"""The selection rule of issue 32 against the one before it, on the same committed search: which methods the old
one-standard-error step would have sent to another rate, and on what validation gap.

    python bench/rule_evidence.py --experiment mlp transformer

The old rule (main 9631bf2): among the rates no tuning seed diverged at, the smallest rate whose mean count lies
within one standard error (of the best rate's counts over the tuning seeds) of the best rate's mean. The new rule
(protocol.choose): the best total count, a near tie swept as a runner-up instead of chosen. Both read only the
validation counts of results/<experiment>_lr_search.csv, and the new rule's flags from its "flag" column.
"""

import argparse
import math

import pandas as pd
import torch

from common import record, table  # first: puts the repo on sys.path
from experiments import protocol, storage


def one_se_step(lrs: list[float], counts: list[list[int]], flags: list[str]) -> float | None:
    """The old rule's choice on one method's grid (flags stand in for its "diverged")."""
    eligible = [i for i in range(len(lrs)) if not flags[i]]
    if not eligible:
        return None
    sums = [sum(c) for c in counts]
    best = max(eligible, key=lambda i: (sums[i], -i))
    n = len(counts[best])
    mean = sums[best] / n
    se = math.sqrt(sum((c - mean) ** 2 for c in counts[best]) / (n - 1) / n) if n > 1 else 0.0
    return lrs[min(i for i in eligible if sums[i] >= sums[best] - n * se)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", nargs="+", default=["mlp", "transformer"])
    args = p.parse_args()
    parts = []
    for name in args.experiment:
        search = pd.read_csv(storage.Outputs(name).lr_search)
        rows, methods = [], 0
        for method, g in search.groupby("method", sort=False):
            g = g.sort_values("lr")
            counts = [[int(c) for c in str(v).split()] for v in g.val_correct]
            flags = g.flag.fillna("").tolist()
            new, old = protocol.choose(g.lr.tolist(), counts, flags), one_se_step(g.lr.tolist(), counts, flags)
            methods += 1
            if old != new.lr:
                n_val = round(sum(counts[0]) / len(counts[0]) / g.iloc[0][[c for c in g.columns if c.endswith("_mean")][0]])
                gap = (sum(counts[g.lr.tolist().index(new.lr)]) - sum(counts[g.lr.tolist().index(old)])) / len(counts[0])
                rows.append([method, f"{new.lr:g}", f"{old:g}", f"{100 * gap / n_val:.3f}",
                             "yes" if new.runner_up == old else "no"])
        parts.append(f"**{name}**: the one-SE step would move {len(rows)} of {methods} choices"
                     + (":\n\n" + table(["method", "chosen now", "one-SE step's", "validation gap, points (mean "
                                         "over tuning seeds)", "swept now as the runner-up"], rows) if rows else "."))
    record("Issue 32: the new selection rule against the one-SE step, on the committed search",
           "\n\n".join(parts), torch.device("cpu"))


if __name__ == "__main__":
    main()

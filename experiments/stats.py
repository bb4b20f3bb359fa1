"""Intervals over seeds: a mean with its 95% t-interval, and the paired difference of each method to a baseline.

Every method of one seed starts from the same pretrained weights and sees the same data order, so methods are
compared seed by seed: the mean of the per-seed differences, with a t-interval over seeds. A difference is
called real only when its interval excludes zero.
"""

import math

import pandas as pd
from scipy import stats


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student's t-interval of the mean; (mean, nan, nan) for a single value."""
    x = pd.Series(values, dtype="float64").dropna()
    mean, n = x.mean(), len(x)
    if n < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_differences(per_seed: pd.DataFrame, metric: str, baseline: str = "full") -> pd.DataFrame:
    """Per method: the mean over seeds of (method - baseline) in `metric`, with its 95% t-interval.

    Columns method, diff_mean, diff_low, diff_high, diff_seeds. Only seeds that both ran are paired.
    """
    wide = per_seed.pivot(index="seed", columns="method", values=metric)
    if baseline not in wide:
        raise ValueError(f"baseline {baseline!r} is not among the methods {list(wide.columns)}")
    rows = []
    for method in per_seed["method"].drop_duplicates():
        d = (wide[method] - wide[baseline]).dropna()
        mean, low, high = mean_ci(d)
        rows.append({"method": method, "diff_mean": mean, "diff_low": low, "diff_high": high, "diff_seeds": len(d)})
    return pd.DataFrame(rows)

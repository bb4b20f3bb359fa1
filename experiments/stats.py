"""Intervals and verdicts: a mean with its 95% t-interval, and the paired difference of each method to a baseline,
with the noise of the seeds and of the test set in its interval, tested with Holm's correction.

Every method of one seed starts from the same pretrained weights and sees the same data order, so methods are
compared seed by seed, on the same test examples. The difference of two methods, as scores D[s, i] in {-1, 0, 1}
on seed s and test example i, has two sources of noise: the seeds (another seed trains another model) and the
test set (another sample of examples would score otherwise). With D = mu + a_s + b_i + e_si (seed, example and
residual effects, a crossed two-way design), the mean over S seeds and N examples has variance

    var = var(a) / S + var(b) / N + var(e) / (S N) = (MS_seed + MS_example - MS_residual) / (S N)

in the two-way analysis of variance's mean squares, which is how it is estimated here (where the example term
comes out negative, it is dropped: the seeds' term alone). The interval is mean ± t · SE with Satterthwaite's
degrees of freedom for that combination of mean squares: about S - 1 where the seeds' noise dominates, many more
where the test set's does. Without per-example scores only the seeds' term is there: Student's t-interval over the
per-seed differences. tests/test_report.py checks the formula on a known case and its coverage by simulation.

Verdicts: "below" / "above" where Holm's correction over the family (one column of one table: every method
against full finetuning, or DoRA against LoRA) rejects "no difference"; "matches" where it rejects "a difference
of at least MARGIN" with the whole interval inside ±MARGIN (two one-sided tests, p doubled so that it matches the
95% interval). Each of the two kinds of verdict is Holm-corrected on its own, at 5% familywise.
"""

import math

import numpy as np
import pandas as pd
from scipy import stats

from .storage import unpack_bits

LEVEL = 0.95    # of every interval, and 1 - the familywise error rate of the verdicts
MARGIN = 0.01   # "matches": the difference lies within ±1 point


def mean_ci(values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student's t-interval of the mean; (mean, nan, nan) for a single value."""
    x = pd.Series(values, dtype="float64").dropna()
    mean, n = x.mean(), len(x)
    if n < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def difference(d: np.ndarray, items: np.ndarray | None = None, level: float = LEVEL) -> dict:
    """The paired difference from per-seed differences d (S,) and, where known, the per-example differences
    items (S, N) in {-1, 0, 1} (then d is their row means): its mean, interval, degrees of freedom, the p-value of
    "no difference" and of "a difference of at least MARGIN" (the larger of the two one-sided tests, doubled so
    that it is below 1 - level exactly when the whole interval lies inside ±MARGIN)."""
    d = np.asarray(d, dtype=np.float64)
    S, mean = len(d), float(np.mean(d))
    if S < 2:
        return {"diff_mean": mean, "diff_low": math.nan, "diff_high": math.nan, "df": math.nan, "p": math.nan,
                "p_match": math.nan}
    var, df = d.var(ddof=1) / S, S - 1  # the seeds' term alone
    if items is not None:
        var, df = crossed_variance(np.asarray(items, dtype=np.float64))
    se = math.sqrt(var)
    t = stats.t(df)
    half = t.ppf(0.5 + level / 2) * se
    if se == 0:
        p = 1.0 if mean == 0 else 0.0
        p_match = 0.0 if abs(mean) < MARGIN else 1.0
    else:
        p = 2 * t.sf(abs(mean) / se)
        p_match = min(1.0, 2 * max(t.sf((mean + MARGIN) / se), t.sf((MARGIN - mean) / se)))
    return {"diff_mean": mean, "diff_low": mean - half, "diff_high": mean + half, "df": df, "p": p,
            "p_match": p_match}


def crossed_variance(D: np.ndarray) -> tuple[float, float]:
    """(variance of D's grand mean, its Satterthwaite degrees of freedom) for a seeds x examples table D (S, N):
    (MS_seed + MS_example - MS_residual) / (S N), the example term dropped where it comes out negative."""
    S, N = D.shape
    grand = D.mean()
    seed_means, example_means = D.mean(1), D.mean(0)  # (S,), (N,)
    ss_seed = N * ((seed_means - grand) ** 2).sum()
    ss_example = S * ((example_means - grand) ** 2).sum()
    ss_residual = max(((D - grand) ** 2).sum() - ss_seed - ss_example, 0.0)
    ms_seed, ms_example = ss_seed / (S - 1), ss_example / (N - 1)
    ms_residual = ss_residual / ((S - 1) * (N - 1))
    if ms_example <= ms_residual:  # no example effect to estimate: the seeds' term alone, S - 1 degrees of freedom
        return ms_seed / (S * N), S - 1
    total = ms_seed + ms_example - ms_residual
    denominator = ms_seed ** 2 / (S - 1) + ms_example ** 2 / (N - 1) + ms_residual ** 2 / ((S - 1) * (N - 1))
    return total / (S * N), total ** 2 / denominator if denominator > 0 else math.inf


def paired_differences(per_seed: pd.DataFrame, metric: str, baseline: str = "full") -> pd.DataFrame:
    """Per method: the mean over seeds of (method - baseline) in `metric`, with its interval and p-values
    (`difference`); with a "test_correct" column (storage.pack_bits per run) the test set's noise is in them.

    Columns method, diff_mean, diff_low, diff_high, p, p_match, diff_seeds. Only seeds that both ran are paired.
    """
    wide = per_seed.pivot(index="seed", columns="method", values=metric)
    if baseline not in wide:
        raise ValueError(f"baseline {baseline!r} is not among the methods {list(wide.columns)}")
    bits = per_seed.set_index(["method", "seed"])["test_correct"] if "test_correct" in per_seed else None
    rows = []
    for method in per_seed["method"].drop_duplicates():
        d = (wide[method] - wide[baseline]).dropna()
        items = None
        if bits is not None and len(d):
            items = np.stack([unpack_bits(bits[method, s]).astype(np.int8) - unpack_bits(bits[baseline, s])
                              for s in d.index])  # (S, N) in {-1, 0, 1}
        rows.append({"method": method, **difference(d.to_numpy(), items), "diff_seeds": len(d)})
    return pd.DataFrame(rows)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: the k-th smallest times (m - k + 1), made monotone, at most 1. A
    hypothesis is rejected at familywise level alpha where its adjusted p-value is below alpha. NaN stays NaN
    and does not count towards m."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(len(p), math.nan)
    known = np.flatnonzero(~np.isnan(p))
    order = known[np.argsort(p[known], kind="stable")]
    m, running = len(order), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        out[i] = running
    return out.tolist()


def verdict(p_adjusted: float, p_match_adjusted: float, mean: float, level: float = LEVEL) -> str:
    """"matches" (the whole interval within ±1 point), else "above" or "below" (zero excluded), else "not
    distinguishable from"; "" where there is no test (full finetuning against itself, one seed, a diverged row).
    Both p-values Holm-adjusted within the family."""
    alpha = 1 - level
    if math.isnan(p_adjusted):
        return ""
    if p_match_adjusted < alpha:
        return "matches"
    if p_adjusted < alpha:
        return "above" if mean > 0 else "below"
    return "not distinguishable from"

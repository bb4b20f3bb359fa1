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

Verdicts, one family at a time (one column of one table: every method against full finetuning, or each variant
against LoRA at the same rank): Bonferroni's correction over the family's m comparisons, so that every interval
printed is the simultaneous one at level 1 - 0.05 / m and each verdict can be read off it. With a margin M fixed
per task before the run, an interval
    wholly below 0 and wholly inside ±M   -> "below, within ±M"   (a real difference, but a small one)
    wholly below 0                        -> "below"
    containing 0, wholly inside ±M        -> "within ±M"
    containing 0, reaching past ±M        -> "not distinguishable"
("above" likewise). "borderline" is added where a deciding adjusted p-value lies within a factor of 3 of 0.05: a
re-run on new seeds could well move that verdict. (Holm's step-down would reject a little more often, but has no
interval that a reader can check a verdict against.)
"""

import math

import numpy as np
import pandas as pd
from scipy import stats

from .storage import unpack_bits

LEVEL = 0.95       # of every interval, and 1 - the familywise error rate of the verdicts
BORDERLINE = 3.0   # a verdict is borderline where a deciding adjusted p lies within this factor of 1 - LEVEL


def mean_ci(values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student's t-interval of the mean; (mean, nan, nan) for a single value."""
    x = pd.Series(values, dtype="float64").dropna()
    mean, n = x.mean(), len(x)
    if n < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def difference(d: np.ndarray, items: np.ndarray | None = None) -> dict:
    """The paired difference from per-seed differences d (S,) and, where known, the per-example differences
    items (S, N) in {-1, 0, 1} (then d is their row means): its mean, standard error and degrees of freedom, and
    the test set's floor: the standard error that would remain with infinitely many seeds (the example term)."""
    d = np.asarray(d, dtype=np.float64)
    S, mean = len(d), float(np.mean(d))
    if S < 2:
        return {"diff_mean": mean, "se": math.nan, "df": math.nan, "floor_se": math.nan}
    var, df, floor = d.var(ddof=1) / S, S - 1, math.nan  # the seeds' term alone
    if items is not None:
        var, df, floor = crossed_variance(np.asarray(items, dtype=np.float64))
    return {"diff_mean": mean, "se": math.sqrt(var), "df": df, "floor_se": math.sqrt(floor)}


def family(rows: pd.DataFrame, margin: float, level: float = LEVEL, m: int | None = None) -> pd.DataFrame:
    """Intervals, adjusted p-values and verdicts for one family of differences (rows with diff_mean, se, df),
    Bonferroni-corrected over its m rows: each interval at level 1 - (1 - level) / m; p the adjusted p-value of
    "no difference", p_match that of "a difference of at least `margin`" (two one-sided tests, doubled so that
    it is below 1 - level exactly when the interval lies inside ±margin). Columns diff_low, diff_high, p,
    p_match, floor (the half-width the test set alone leaves, at the same level) and verdict. m: the family's
    size where `rows` are only some of it."""
    m, alpha = m or len(rows), 1 - level
    out = []
    for mean, se, df, floor_se in zip(rows["diff_mean"], rows["se"], rows["df"], rows.get("floor_se", rows["se"] * math.nan)):
        if math.isnan(se):
            out.append({"diff_low": math.nan, "diff_high": math.nan, "p": math.nan, "p_match": math.nan,
                        "floor": math.nan, "verdict": ""})
            continue
        t = stats.t(df)
        half = t.ppf(1 - alpha / m / 2) * se
        if se == 0:
            p, p_match = (1.0 if mean == 0 else 0.0), (0.0 if abs(mean) < margin else 1.0)
        else:
            p = 2 * t.sf(abs(mean) / se)
            p_match = 2 * max(t.sf((mean + margin) / se), t.sf((margin - mean) / se))
        p, p_match = min(1.0, m * p), min(1.0, m * p_match)
        out.append({"diff_low": mean - half, "diff_high": mean + half, "p": p, "p_match": p_match,
                    "floor": stats.norm.ppf(1 - alpha / m / 2) * floor_se, "verdict": verdict(p, p_match, mean, margin, level)})
    return pd.DataFrame(out, index=rows.index, columns=["diff_low", "diff_high", "p", "p_match", "floor", "verdict"])


def crossed_variance(D: np.ndarray) -> tuple[float, float, float]:
    """(variance of D's grand mean, its Satterthwaite degrees of freedom, the example term's share of it) for a
    seeds x examples table D (S, N): (MS_seed + MS_example - MS_residual) / (S N), the example term
    (MS_example - MS_residual) / (S N) dropped where it comes out negative; that term is var(b) / N, what the
    variance tends to with infinitely many seeds."""
    S, N = D.shape
    grand = D.mean()
    seed_means, example_means = D.mean(1), D.mean(0)  # (S,), (N,)
    ss_seed = N * ((seed_means - grand) ** 2).sum()
    ss_example = S * ((example_means - grand) ** 2).sum()
    ss_residual = max(((D - grand) ** 2).sum() - ss_seed - ss_example, 0.0)
    ms_seed, ms_example = ss_seed / (S - 1), ss_example / (N - 1)
    ms_residual = ss_residual / ((S - 1) * (N - 1))
    if ms_example <= ms_residual:  # no example effect to estimate: the seeds' term alone, S - 1 degrees of freedom
        return ms_seed / (S * N), S - 1, 0.0
    total = ms_seed + ms_example - ms_residual
    denominator = ms_seed ** 2 / (S - 1) + ms_example ** 2 / (N - 1) + ms_residual ** 2 / ((S - 1) * (N - 1))
    df = total ** 2 / denominator if denominator > 0 else math.inf
    return total / (S * N), df, (ms_example - ms_residual) / (S * N)


def paired_differences(per_seed: pd.DataFrame, metric: str, baseline: str = "full") -> pd.DataFrame:
    """Per method: the mean over seeds of (method - baseline) in `metric`, with its standard error
    (`difference`); with a "test_correct" column (storage.pack_bits per run) the test set's noise is in them.

    Columns method, diff_mean, se, df, floor_se, diff_seeds. Only seeds that both ran are paired.
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


def verdict(p: float, p_match: float, mean: float, margin: float, level: float = LEVEL) -> str:
    """The verdict that a family's adjusted p-values allow (see the module's docstring): "below, within ±M",
    "below", "within ±M", "not distinguishable" ("above" likewise), with " (borderline)" where either p-value lies
    within a factor BORDERLINE of 1 - level; "" where there is no test (no interval)."""
    alpha = 1 - level
    if math.isnan(p):
        return ""
    within = f"within ±{100 * margin:g}"
    side = "above" if mean > 0 else "below"
    word = {(True, True): f"{side}, {within}", (True, False): side, (False, True): within,
            (False, False): "not distinguishable"}[p < alpha, p_match < alpha]
    near = any(alpha / BORDERLINE <= q <= alpha * BORDERLINE for q in (p, p_match))
    return word + (" (borderline)" if near else "")

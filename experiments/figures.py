"""The figure of any experiment: trainable parameters against test accuracy, and each method's paired
difference to full finetuning."""

import math
from collections.abc import Callable

import matplotlib.ticker
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no global figure state, no second copy shown in notebooks

from .methods import TARGET_SET_LABELS
from .report import accuracy_column, method_label, points

COLORS = ("tab:blue", "tab:orange", "tab:purple")  # one per LoRA series; the linear probe is red


def full_band(ax, full, mean: str, std: str) -> None:
    """Full finetuning as a line at its mean and a band of ± std; its legend entry explains every error bar."""
    ax.axhspan(full[mean] - full[std], full[mean] + full[std], color="tab:green", alpha=0.2, lw=0)
    ax.axhline(full[mean], color="tab:green", lw=1.5, label=f"full finetuning, {int(full['trainable_params']):,} "
               f"params\n(line: mean; band and every error bar: ± std over {int(full['seeds'])} seeds)")


def log_params_axis(ax) -> None:
    """A log x axis of trainable parameters, labelled 1,000 and, smaller, 2,000 and 5,000."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    leading = lambda v: round(v / 10 ** math.floor(math.log10(v)))  # 2 for 2,000, 5 for 500, ...
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:,.0f}" if v > 0 and leading(v) in (2, 5) else ""))  # 2x and 5x ticks only
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.grid(True, which="both", alpha=0.3)


def difference_panel(ax, rows: pd.DataFrame, labels: list[str], colors: list[str], margin: float) -> None:
    """Each row's paired difference to full finetuning in points with its simultaneous interval (the level its
    verdict uses: seeds' and test set's noise, stats.py), the first row on top; the band is the ±margin that
    "within" asks an interval to lie in."""
    y = range(len(rows), 0, -1)
    diff, low, high = (100 * rows[c].to_numpy() for c in ("diff_vs_full", "diff_vs_full_low", "diff_vs_full_high"))
    ax.axvspan(-100 * margin, 100 * margin, color="tab:green", alpha=0.1, lw=0)
    for yi, d, lo, hi, color in zip(y, diff, low, high, colors):
        ax.errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="tab:green", lw=1.5)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel(f"test accuracy − full finetuning's, same seed (points)\nshaded: within {points(margin)}")
    ax.set_title(f"paired difference to full finetuning,\nsimultaneous 95% intervals (Bonferroni over {len(rows)};\n"
                 "noise of the seeds and of the test set)", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)


def side_by_side(xs: list[pd.Series], step: float = 1.08) -> list[list[float]]:
    """Where to draw each series' points on a log x axis: points of different series whose parameter counts lie
    within 8% of each other are spread `step` apart around their geometric mean, so that no error bar hides
    another; every other point stays at its own count."""
    out = [list(map(float, x)) for x in xs]
    group = []
    for x, s, i in sorted((x, s, i) for s, xi in enumerate(out) for i, x in enumerate(xi)) + [(math.inf, 0, 0)]:
        if group and x > 1.08 * group[-1][0]:
            center = math.prod(g[0] for g in group) ** (1 / len(group))
            for k, (_, gs, gi) in enumerate(group):
                out[gs][gi] = center * step ** (k - (len(group) - 1) / 2)
            group = []
        group.append((x, s, i))
    return out


def diverged_rows(rows: pd.DataFrame) -> pd.Series:
    """Which rows had a seed diverge (their diverged_mean, where the summary has one)."""
    return rows["diverged_mean"].fillna(0) > 0 if "diverged_mean" in rows else pd.Series(False, index=rows.index)


def plot(results: pd.DataFrame, title: str, ylabel: str, margin: float, extra: Callable | None = None) -> Figure:
    """Left: trainable parameters (log x) against test accuracy, one line per LoRA (or DoRA) target set, the
    linear probe as a point, full finetuning as a band; extra(ax) adds an experiment's own lines. Right: each
    method's paired difference to full finetuning. Returns the matplotlib Figure."""
    acc = accuracy_column(results)
    fig = Figure(figsize=(12, 5.2), dpi=120)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    full = results.set_index("method").loc["full"]
    full_band(ax, full, f"{acc}_mean", f"{acc}_std")
    head = results[results["method"] == "head"]
    for _, r in head.iterrows():
        ax.errorbar([r["trainable_params"]], [r[f"{acc}_mean"]], yerr=[r[f"{acc}_std"]], fmt="s", color="tab:red",
                    capsize=3, label=f"linear probe (head only), {int(r['trainable_params']):,} params")
    lora_rows = results[~results["method"].isin(["full", "head"])]
    one_target_set = lora_rows["targets"].nunique() == 1  # then every series has its points at the same ranks
    lora_rows = lora_rows.assign(nf4=lora_rows["nf4"] if "nf4" in lora_rows else False)
    series = list(lora_rows.groupby(["dora", "nf4", "targets"], sort=False))
    xs = side_by_side([rows["trainable_params"] for _, rows in series])
    colors = dict(zip((key for key, _ in series), COLORS))
    for ((dora, nf4, targets), rows), x in zip(series, xs):
        # Ranks go on a top axis (one target set) or in the legend: written beside the points, they collide.
        ranks = "" if one_target_set else ", r = " + ", ".join(str(r) for r in rows["rank"]) + (
            " (left to right)" if len(rows) > 1 else "")
        ax.errorbar(x, rows[f"{acc}_mean"], yerr=rows[f"{acc}_std"], fmt="o-" if len(rows) > 1 else "D",
                    color=colors[dora, nf4, targets], capsize=3,
                    label=f"{'DoRA' if dora else 'QLoRA' if nf4 else 'LoRA'} on {TARGET_SET_LABELS[targets]}{ranks}"
                    + (", hidden layers stored in NF4" if nf4 else ""))
        bad = diverged_rows(rows).to_numpy()
        if bad.any():
            ax.plot([xi for xi, b in zip(x, bad) if b], rows.loc[bad, f"{acc}_mean"], "X", color="black", ms=11,
                    zorder=5, label="some seeds diverged or never learned: no verdict")
    if extra is not None:
        extra(ax)
    log_params_axis(ax)
    ax.margins(x=0.08)
    if one_target_set:
        first = lora_rows.drop_duplicates("rank")  # LoRA's counts, where DoRA's are a little higher
        top = ax.secondary_xaxis("top")
        top.set_xticks(first["trainable_params"], [str(r) for r in first["rank"]], minor=False)
        top.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        top.set_xlabel("rank r")
    ax.set_ylabel(ylabel)
    ax.legend(loc="lower right", fontsize=8)

    others = results[results["method"] != "full"]
    difference_panel(bx, others, [method_label(r, not one_target_set) + (" (diverged)" if bad else "")
                                  for (_, r), bad in zip(others.iterrows(), diverged_rows(others))],
                     [colors.get((r["dora"], r.get("nf4", False), r["targets"]), "tab:red") for _, r in others.iterrows()],
                     margin)
    fig.suptitle(title)
    fig.tight_layout()
    return fig

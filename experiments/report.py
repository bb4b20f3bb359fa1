"""Reporting any experiment: the summary over seeds (one column schema), how an interval and a verdict read,
the results table, and the README's generated blocks."""

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .methods import TARGET_SET_LABELS, Method
from .stats import paired_differences
from .storage import atomic_write, with_int_columns


def summarize(per_seed: pd.DataFrame, methods: list[Method], metric: str, extra_means: tuple[str, ...] = (),
              budget: Mapping[str, object] | None = None) -> pd.DataFrame:
    """One row per method, every experiment with the same columns: method, rank, targets, dora, alpha,
    trainable_params, pct_params_vs_full, {metric}_mean, {metric}_std, pct_acc_vs_full, the paired difference
    (same seeds, 95% interval) to full finetuning (diff_vs_full, _low, _high) and, for DoRA, to LoRA at the same
    rank (diff_vs_lora, _low, _high), the mean of each of `extra_means`, seeds, the `budget` (epochs, batch
    size, ...) and lr. `metric` is the per-seed column of test accuracy."""
    per_seed = per_seed.assign(dora=per_seed["dora"] if "dora" in per_seed else False)
    g = per_seed.groupby("method", sort=False)
    out = g.agg(rank=("rank", "first"), targets=("targets", "first"), dora=("dora", "first"), alpha=("alpha", "first"),
                trainable_params=("trainable_params", "first"), **{f"{metric}_mean": (metric, "mean"),
                f"{metric}_std": (metric, "std")}, **{f"{c}_mean": (c, "mean") for c in extra_means},
                seeds=("seed", "count"), lr=("lr", "first")).reset_index()
    full = out.set_index("method").loc["full"]
    out["pct_params_vs_full"] = 100 * out["trainable_params"] / full["trainable_params"]
    out["pct_acc_vs_full"] = 100 * out[f"{metric}_mean"] / full[f"{metric}_mean"]
    vs_full = paired_differences(per_seed, metric, "full").set_index("method")
    out[["diff_vs_full", "diff_vs_full_low", "diff_vs_full_high"]] = vs_full.loc[
        out["method"], ["diff_mean", "diff_low", "diff_high"]].to_numpy()
    lora_twin = {m.name: dataclasses.replace(m, dora=False).name for m in methods if m.dora}

    def vs_lora(name: str) -> tuple[float, float, float]:
        if name not in lora_twin:
            return math.nan, math.nan, math.nan
        d = paired_differences(per_seed, metric, lora_twin[name]).set_index("method").loc[name]
        return d["diff_mean"], d["diff_low"], d["diff_high"]

    out[["diff_vs_lora", "diff_vs_lora_low", "diff_vs_lora_high"]] = [vs_lora(n) for n in out["method"]]
    for k, v in (budget or {}).items():
        out[k] = v
    columns = ["method", "rank", "targets", "dora", "alpha", "trainable_params", "pct_params_vs_full",
               f"{metric}_mean", f"{metric}_std", "pct_acc_vs_full", "diff_vs_full", "diff_vs_full_low",
               "diff_vs_full_high", "diff_vs_lora", "diff_vs_lora_low", "diff_vs_lora_high",
               *(f"{c}_mean" for c in extra_means), "seeds", *(budget or {}), "lr"]
    return with_int_columns(out[columns])


def accuracy_column(results: pd.DataFrame) -> str:
    """The summary's test-accuracy prefix: "acc_B" where the column is acc_B_mean."""
    (mean,) = [c for c in results.columns if c.endswith("_mean") and f"{c[:-5]}_std" in results.columns]
    return mean[:-5]


def method_label(row, show_targets: bool = True) -> str:
    """How a method reads in tables and figures: "full finetuning", "LoRA r=4", "DoRA on Wq, Wv, r=4"."""
    if row["method"] in ("full", "head"):
        return {"full": "full finetuning", "head": "linear probe (head only)"}[row["method"]]
    on = f" on {TARGET_SET_LABELS[row['targets']]}," if show_targets else ""
    return f"{'DoRA' if bool(row.get('dora', False)) else 'LoRA'}{on} r={row['rank']}"


def interval(mean: float, low: float, high: float) -> str:
    """A difference in points with its 95% interval, "-1.23 (-2.00 to -0.46)"; blank where there is no interval
    (full finetuning against itself, or a single seed)."""
    if pd.isna(low) or (low, high) == (0, 0):
        return ""
    return f"{100 * mean:+.2f} ({100 * low:+.2f} to {100 * high:+.2f})"


def verdict(low: float, high: float) -> str:
    """Where a method stands against a baseline, read off the 95% interval of their paired difference."""
    if low > 0:
        return "above"
    if high < 0:
        return "below"
    return "not distinguishable from"


def verdict_lines(results: pd.DataFrame, show_targets: bool = True) -> str:
    """Full finetuning's accuracy, then one line per other method: its accuracy, its share of full's trainable
    parameters, and its paired difference to full finetuning with the verdict that interval allows."""
    acc = accuracy_column(results)
    full = results.set_index("method").loc["full"]
    lines = [f"full finetuning: {full[f'{acc}_mean']:.4f} ± {full[f'{acc}_std']:.4f} with "
             f"{int(full['trainable_params']):,} trainable parameters"]
    for _, r in results[results["method"] != "full"].iterrows():
        lines.append(f"{method_label(r, show_targets)}: {r[f'{acc}_mean']:.4f} ± {r[f'{acc}_std']:.4f} "
                     f"({int(r['trainable_params']):,} parameters, {r['pct_params_vs_full']:.2f}% of full's): "
                     f"{verdict(r['diff_vs_full_low'], r['diff_vs_full_high'])} full finetuning "
                     f"({interval(r['diff_vs_full'], r['diff_vs_full_low'], r['diff_vs_full_high'])} points)")
    return "\n".join(lines)


def table(results: pd.DataFrame, show_targets: bool = True, accuracy: str = "test accuracy",
          extra: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The results as text cells: method, trainable params, % of full's params, accuracy (mean ± std), the
    difference to full finetuning (95% interval), DoRA − LoRA where DoRA ran, each `extra` column
    ({header: summary column, shown to 3 decimals}) and the learning rate."""
    acc = accuracy_column(results)
    has_dora = bool(results["dora"].fillna(False).astype(bool).any())
    cells = {"method": [method_label(r, show_targets) for _, r in results.iterrows()],
             "trainable params": results["trainable_params"].map("{:,}".format),
             "% of full's params": results["pct_params_vs_full"].map(lambda v: f"{v:.1f}" if v >= 0.95 else f"{v:.2g}"),
             f"{accuracy} (mean ± std)": [f"{m:.4f} ± {s:.4f}" + _diverged_note(r) for (_, r), m, s in
                                           zip(results.iterrows(), results[f"{acc}_mean"], results[f"{acc}_std"])],
             "difference to full finetuning, points (95% interval)": [
                 interval(*v) for v in zip(results.diff_vs_full, results.diff_vs_full_low, results.diff_vs_full_high)]}
    if has_dora:
        cells["DoRA − LoRA at the same rank, points (95% interval)"] = [
            interval(*v) for v in zip(results.diff_vs_lora, results.diff_vs_lora_low, results.diff_vs_lora_high)]
    for header, column in (extra or {}).items():
        cells[header] = results[column].map("{:.3f}".format)
    cells["lr"] = results["lr"].map("{:g}".format)
    return pd.DataFrame(cells)


def _diverged_note(row) -> str:
    """", 3 of 5 seeds diverged" where some did (a diverged_mean column), so that a mean pulled down by them is
    marked in the table itself."""
    share = row.get("diverged_mean", 0)
    return f", {round(share * row['seeds'])} of {int(row['seeds'])} seeds diverged" if share and share > 0 else ""


def markdown(cells: pd.DataFrame) -> str:
    """A plain markdown table of text cells, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(cells.columns) + " |", "|---|" + "---:|" * (len(cells.columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def readme_markers(experiment: str) -> tuple[str, str]:
    """The comments around an experiment's generated block of README.md."""
    name = "results" if experiment == "mlp" else f"{experiment} results"
    return (f"<!-- {name}: written by `python -m experiments readme --experiment {experiment}` -->",
            f"<!-- end of {name} -->")


def replace_readme_block(readme: Path, markers: tuple[str, str], block: str) -> None:
    """Replace what stands between the two marker lines of README.md (each must occur once) with `block`."""
    start, end = markers
    text = readme.read_text()
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{readme} must contain the markers {start!r} and {end!r} once each")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    atomic_write(readme, (head + f"{start}\n{block}\n{end}" + tail).encode())


def _ranks(ranks) -> str:
    """"rank 4", "ranks 1, 2 and 4", or "no rank"."""
    ranks = [str(int(r)) for r in ranks]
    if len(ranks) < 2:
        return f"rank {ranks[0]}" if ranks else "no rank"
    return "ranks " + ", ".join(ranks[:-1]) + " and " + ranks[-1]


def _against(rows: pd.DataFrame, diff: str, baseline: str) -> str:
    """"below <baseline> at ranks 1 and 2, not distinguishable from it at rank 4": each rank's verdict from the
    95% interval of its paired difference, grouped."""
    groups = {}
    for _, r in rows.iterrows():
        groups.setdefault(verdict(r[f"{diff}_low"], r[f"{diff}_high"]), []).append(r["rank"])
    parts = [f"{v} {baseline if i == 0 else 'it'} at {_ranks(ranks)}" for i, (v, ranks) in enumerate(groups.items())]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def findings(results: pd.DataFrame, show_targets: bool = True) -> str:
    """The sentences that state what an MNIST table shows, generated from it so that they hold for whatever a
    run produces: each series' verdicts against full finetuning, the smallest rank whose whole interval lies
    within one point of it, where the curve flattens, and DoRA against LoRA. Each verdict is one uncorrected
    95% interval; the count of comparisons says how much a pattern rests on."""
    acc = accuracy_column(results)
    full = results.set_index("method").loc["full"]
    lora = results[results["method"] != "full"]
    dora = lora[lora["dora"].astype(bool)]
    n = int(full["seeds"])
    out = [f"Paired over {n} seeds ({len(lora)} comparisons with full finetuning, each a 95% interval, "
           f"uncorrected; full finetuning: {full[f'{acc}_mean']:.4f}):"]
    for _, rows in lora.groupby(["targets", "dora"], sort=False):  # one series per target set and kind
        name = method_label(rows.iloc[0], show_targets).rsplit(" r=", 1)[0].rstrip(",")
        s = f"{name} is {_against(rows, 'diff_vs_full', 'full finetuning')}."
        close = rows[rows["diff_vs_full_low"] > -0.01]
        if len(close):
            c = close.iloc[0]
            s += (f" The smallest rank whose whole interval lies within one point of full finetuning is "
                  f"{int(c['rank'])} ({c['pct_params_vs_full']:.0f}% of its parameters, "
                  f"{interval(c['diff_vs_full'], c['diff_vs_full_low'], c['diff_vs_full_high'])} points).")
        else:
            s += " At no rank does the whole interval lie within one point of full finetuning."
        gap = rows[f"{acc}_mean"].max() - rows[f"{acc}_mean"]  # below the series' best mean
        # the smallest rank from which every larger rank is within a quarter point of the best, if there is one:
        # where the largest rank is further below the best, the curve falls again and does not flatten
        flat_from = min((k for k in rows["rank"] if (gap[rows["rank"] >= k] <= 0.0025).all()), default=None)
        flat = rows[rows["rank"] >= flat_from] if flat_from is not None else rows.iloc[:0]
        if len(flat) > 1:
            s += (f" From rank {int(flat_from)} on its means lie within a quarter point of its best "
                  f"({flat[f'{acc}_mean'].min():.4f} to {flat[f'{acc}_mean'].max():.4f}).")
        out.append(s)
    if len(dora):
        decided = dora[(dora["diff_vs_lora_low"] > 0) | (dora["diff_vs_lora_high"] < 0)]
        out.append(f"DoRA against LoRA at the same rank ({len(dora)} paired comparisons): DoRA is "
                   f"{_against(dora, 'diff_vs_lora', 'LoRA')}"
                   + (" (" + "; ".join(f"r={int(r['rank'])}: " + interval(r['diff_vs_lora'], r['diff_vs_lora_low'],
                                                                          r['diff_vs_lora_high'])
                                      for _, r in decided.iterrows()) + " points)" if len(decided) else "")
                   + f". Were the two equal, at least one of {len(dora)} independent 95% intervals would exclude "
                   f"zero by chance {100 * (1 - 0.95 ** len(dora)):.0f}% of the time.")
    return " ".join(out[:1] + diverged(results, show_targets) + out[1:])


def diverged(results: pd.DataFrame, show_targets: bool = True) -> list[str]:
    """A sentence for each method some of whose seeds diverged (a "diverged_mean" column: the share of its seeds
    whose training loss ended at chance level): their accuracies are in its mean and interval as they came."""
    if "diverged_mean" not in results:
        return []
    out = []
    for _, r in results[results["diverged_mean"] > 0].iterrows():
        n = int(r["seeds"])
        out.append(f"{method_label(r, show_targets)} diverged on {round(r['diverged_mean'] * n)} of {n} seeds at "
                   f"its learning rate {r['lr']:g} (their training loss ended at chance level), which the search "
                   f"chose on the tuning seeds: its mean and interval include those "
                   f"seeds as they came, and every comparison with it below rests on them.")
    return out

"""Reporting the text experiment: the summary with intervals and paired differences, the figure, the README block."""

import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from report import (TARGET_LABELS, difference_panel, full_band, log_params_axis, method_label,
                    replace_readme_block, side_by_side)
from stats import mean_ci, paired_differences
from storage import Outputs, load_results, with_int_columns
from text_config import TextConfig

MARKERS = ("<!-- text results: written by `python text_experiment.py readme` from results/text.csv and "
           "results/text_config.json -->", "<!-- end of text results -->")


def summarize(per_seed: pd.DataFrame, cfg: TextConfig) -> pd.DataFrame:
    """One row per method: test accuracy mean, std and 95% interval over seeds, and the paired difference to
    full finetuning (same seeds) with its 95% interval."""
    rows = []
    for method, g in per_seed.groupby("method", sort=False):
        mean, low, high = mean_ci(g["test_acc"])
        rows.append({"method": method, "targets": g["targets"].iloc[0], "rank": g["rank"].iloc[0],
                     "alpha": g["alpha"].iloc[0], "trainable_params": g["trainable_params"].iloc[0],
                     "acc_mean": mean, "acc_std": g["test_acc"].std(), "acc_ci_low": low, "acc_ci_high": high,
                     "seeds": len(g), "lr": g["lr"].iloc[0]})
    out = pd.DataFrame(rows).merge(paired_differences(per_seed, "test_acc", "full"), on="method")
    out = out.rename(columns={"diff_mean": "diff_vs_full", "diff_low": "diff_vs_full_low",
                              "diff_high": "diff_vs_full_high"}).drop(columns="diff_seeds")
    out["epochs"], out["batch_size"], out["max_len"] = cfg.epochs, cfg.batch_size, cfg.max_len
    return with_int_columns(out)


def plot(results: pd.DataFrame, majority: float) -> Figure:
    """Left: trainable parameters (log x) against test accuracy, mean ± std over seeds. Right: each method's
    paired difference to full finetuning with its 95% interval."""
    fig = Figure(figsize=(12, 5.2), dpi=120)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    by = results.set_index("method")
    full, head = by.loc["full"], by.loc["head"]
    full_band(ax, full, "acc_mean", "acc_std")
    ax.axhline(majority, color="tab:gray", ls=":", lw=1.2, label=f"always 'positive' (majority class), {majority:.3f}")
    ax.errorbar([head.trainable_params], [head.acc_mean], yerr=[head.acc_std], fmt="s", color="tab:red", capsize=3,
                label=f"linear probe (head only), {int(head.trainable_params):,} params")
    series = [results[results.targets == t] for t in ("qv", "qkvo", "all")]
    colors = {"qv": "tab:blue", "qkvo": "tab:orange", "all": "tab:purple"}
    for rows, x in zip(series, side_by_side([rows.trainable_params for rows in series])):
        targets, ranks = rows.targets.iloc[0], ", ".join(str(r) for r in rows["rank"])
        ax.errorbar(x, rows.acc_mean, yerr=rows.acc_std, fmt="o-" if len(rows) > 1 else "D", color=colors[targets],
                    capsize=3, label=f"LoRA on {TARGET_LABELS[targets]} (+ head), r = {ranks}"
                                     + (" (left to right)" if len(rows) > 1 else ""))
    log_params_axis(ax)
    ax.set_ylabel("test accuracy, positive vs negative review")
    ax.legend(loc="lower right", fontsize=8)

    others = results[results.method != "full"]
    difference_panel(bx, others, [method_label(r) for _, r in others.iterrows()],
                     [colors.get(t, "tab:red") for t in others.targets])
    fig.suptitle(f"MiniLM-L6 on drug-review sentiment: LoRA against full finetuning, every method "
                 f"{int(full.epochs)} epochs at batch size {int(full.batch_size)}")
    fig.tight_layout()
    return fig


def markdown_table(results: pd.DataFrame, config: dict) -> str:
    """The README block: the table of results/text.csv and what produced it."""
    lines = ["| method | trainable params | test accuracy (mean ± std) | 95% interval | "
             "difference to full finetuning, points (95% interval) | lr |", "|---|---:|---:|---:|---:|---:|"]
    for _, r in results.iterrows():
        diff = ("" if r["method"] == "full" else
                f"{100 * r['diff_vs_full']:+.1f} ({100 * r['diff_vs_full_low']:+.1f} to {100 * r['diff_vs_full_high']:+.1f})")
        lines.append(f"| {method_label(r)} | {r['trainable_params']:,} | {r['acc_mean']:.4f} ± {r['acc_std']:.4f} | "
                     f"{r['acc_ci_low']:.3f}–{r['acc_ci_high']:.3f} | {diff} | {r['lr']:g} |")
    c, env, data = config["config"], config["environment"], config["data"]
    lines += ["", f"{c['seeds']} seeds; {data['train']} training, {data['val']} validation and {data['test']} test "
              f"reviews ({100 * data['majority']:.1f}% of the test reviews are positive); every method "
              f"{c['epochs']} epoch{'s' * (c['epochs'] > 1)} at batch size {c['batch_size']}, at most {c['max_len']} tokens, Adam with a "
              f"cosine schedule{', bf16 autocast' if c['amp'] and env['device'].startswith('cuda') else ''}. "
              f"Weights: {config['weights']['weights']}. The runs' training time, summed (cached runs included): "
              f"{config['tune_seconds']:.0f} s for the learning-rate search and {config['sweep_seconds']:.0f} s for "
              f"the sweep on {env['device_name']}, torch {env['torch']}."]
    return "\n".join(lines)


def update_readme(readme: Path, out: Outputs) -> None:
    """Replace the block between MARKERS with the markdown_table of results/text.csv."""
    replace_readme_block(readme, MARKERS, markdown_table(load_results(out), json.loads(out.config.read_text())))


def verdict(row) -> str:
    """Where a method stands against full finetuning, read off its paired 95% interval."""
    if row["diff_vs_full_low"] > 0:
        return "above full finetuning"
    if row["diff_vs_full_high"] < 0:
        return "below full finetuning"
    return "not distinguishable from full finetuning"


def discussion(results: pd.DataFrame, majority: float) -> str:
    """The notebook's discussion, sentence by sentence from the numbers."""
    by = results.set_index("method")
    full = by.loc["full"]
    lines = [f"Always answering 'positive' scores {majority:.3f} on the test reviews; full finetuning scores "
             f"{full.acc_mean:.4f} ± {full.acc_std:.4f} with {int(full.trainable_params):,} trainable parameters."]
    for method, r in by.drop(index="full").iterrows():
        share = 100 * r.trainable_params / full.trainable_params
        lines.append(f"- {method_label({**r, 'method': method})}: {r.acc_mean:.4f} ± {r.acc_std:.4f} with "
                     f"{int(r.trainable_params):,} parameters ({share:.2f}% of full's); paired difference "
                     f"{100 * r.diff_vs_full:+.1f} points ({100 * r.diff_vs_full_low:+.1f} to "
                     f"{100 * r.diff_vs_full_high:+.1f}): {verdict(r)}.")
    qv = results[results.targets == "qv"]
    level = qv[(qv.diff_vs_full_high >= 0)]
    if len(level):
        r = level.iloc[0]
        lines.append(f"The smallest rank of LoRA on Wq, Wv not below full finetuning is r={r['rank']}, with "
                     f"{100 * r.trainable_params / full.trainable_params:.2f}% of its trainable parameters.")
    else:
        lines.append("At every rank, LoRA on Wq, Wv stays below full finetuning.")
    return "\n".join(lines)

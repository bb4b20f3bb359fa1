"""Reporting an MNIST experiment: the summary over seeds, the figure, and the README's results blocks."""

import dataclasses
import json
import math
from pathlib import Path

import matplotlib.ticker
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no global figure state, no second copy shown in notebooks

from config import Config
from stats import paired_differences
from storage import Outputs, atomic_write, load_results

# The reference notebook's published table (github.com/sunildkumar/lora_from_scratch): trainable parameters and
# test accuracy. Its "full finetune" was trained and tested on digits 0-4 by a bug; its LoRA runs got up to
# 100 epochs x ~421 steps = ~42,100 steps, about 40x the 1,050 of ours.
REFERENCE = {"full": (54_700, 0.984), 1: (1_045, 0.8747), 2: (2_090, 0.9314955), 4: (4_180, 0.9640),
             8: (8_360, 0.9710), 16: (16_720, 0.9765), 32: (33_440, 0.9796), 64: (66_880, 0.9804567)}
TARGET_LABELS = {"all": "every nn.Linear", "qv": "Wq, Wv", "qkvo": "Wq, Wk, Wv, Wo"}  # + the head, for the transformer


def summarize(per_seed: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """One row per method: mean and std over seeds, parameters and accuracy relative to full finetuning, and
    paired differences (same seeds, 95% interval) to full finetuning and, for DoRA, to LoRA at the same rank."""
    g = per_seed.groupby("method", sort=False)
    out = g.agg(rank=("rank", "first"), targets=("targets", "first"), dora=("dora", "first"), alpha=("alpha", "first"),
                trainable_params=("trainable_params", "first"),
                acc_B_mean=("acc_B", "mean"), acc_B_std=("acc_B", "std"), acc_A_after_mean=("acc_A_after", "mean"),
                acc_A_pretrained_mean=("acc_A_pretrained", "mean"), seeds=("seed", "count"), lr=("lr", "first")).reset_index()
    full = out.set_index("method").loc["full"]
    out["pct_params_vs_full"] = 100 * out["trainable_params"] / full["trainable_params"]
    out["pct_acc_vs_full"] = 100 * out["acc_B_mean"] / full["acc_B_mean"]
    vs_full = paired_differences(per_seed, "acc_B", "full").set_index("method")
    out[["diff_vs_full", "diff_vs_full_low", "diff_vs_full_high"]] = vs_full.loc[
        out["method"], ["diff_mean", "diff_low", "diff_high"]].to_numpy()
    lora_twin = {m.name: dataclasses.replace(m, dora=False).name for m in cfg.methods if m.dora}

    def vs_lora(name: str) -> tuple[float, float, float]:
        if name not in lora_twin:
            return math.nan, math.nan, math.nan
        d = paired_differences(per_seed, "acc_B", lora_twin[name]).set_index("method").loc[name]
        return d["diff_mean"], d["diff_low"], d["diff_high"]

    out[["diff_vs_lora", "diff_vs_lora_low", "diff_vs_lora_high"]] = [vs_lora(n) for n in out["method"]]
    out["epochs"], out["batch_size"] = cfg.finetune_epochs, cfg.batch_size
    return out[["method", "rank", "targets", "dora", "alpha", "trainable_params", "pct_params_vs_full", "acc_B_mean",
                "acc_B_std", "pct_acc_vs_full", "diff_vs_full", "diff_vs_full_low", "diff_vs_full_high",
                "diff_vs_lora", "diff_vs_lora_low", "diff_vs_lora_high", "acc_A_after_mean", "acc_A_pretrained_mean",
                "seeds", "epochs", "batch_size", "lr"]]


def method_label(row, show_targets: bool = True) -> str:
    """How a method reads in tables and figures: "full finetuning", "LoRA r=4", "DoRA on Wq, Wv, r=4"."""
    if row["method"] in ("full", "head"):
        return {"full": "full finetuning", "head": "linear probe (head only)"}[row["method"]]
    on = f" on {TARGET_LABELS[row['targets']]}," if show_targets else ""
    return f"{'DoRA' if row.get('dora', False) else 'LoRA'}{on} r={row['rank']}"


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


def difference_panel(ax, rows: pd.DataFrame, labels: list[str], colors: list[str]) -> None:
    """Each row's paired difference to full finetuning in points with its 95% interval, the first row on top."""
    y = range(len(rows), 0, -1)
    diff, low, high = (100 * rows[c].to_numpy() for c in ("diff_vs_full", "diff_vs_full_low", "diff_vs_full_high"))
    for yi, d, lo, hi, color in zip(y, diff, low, high, colors):
        ax.errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="tab:green", lw=1.5)
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.set_xlabel("test accuracy − full finetuning's, same seed (points)")
    ax.set_title("paired difference to full finetuning, 95% interval", fontsize=10)
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


def plot(results: pd.DataFrame, cfg: Config) -> Figure:
    """Left: trainable parameters (log x) against test accuracy on task B, one line per LoRA (or DoRA) target set,
    full finetuning as a band, and for the MLP the reference notebook's table. Right: each method's paired
    difference to full finetuning. Returns the matplotlib Figure."""
    fig = Figure(figsize=(12, 5.2), dpi=120)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    full = results.set_index("method").loc["full"]
    full_band(ax, full, "acc_B_mean", "acc_B_std")
    lora_rows = results[results["method"] != "full"]
    one_target_set = lora_rows["targets"].nunique() == 1  # then every series has its points at the same ranks
    series = list(lora_rows.groupby(["dora", "targets"], sort=False))
    xs = side_by_side([rows["trainable_params"] for _, rows in series])
    colors = dict(zip((key for key, _ in series), ("tab:blue", "tab:orange", "tab:purple")))
    for ((dora, targets), rows), x in zip(series, xs):
        # Ranks go on a top axis (one target set) or in the legend: written beside the points, they collide.
        ranks = "" if one_target_set else ", r = " + ", ".join(str(r) for r in rows["rank"]) + " (left to right)"
        ax.errorbar(x, rows["acc_B_mean"], yerr=rows["acc_B_std"], fmt="o-", color=colors[dora, targets],
                    capsize=3, label=f"{'DoRA' if dora else 'LoRA'} on {TARGET_LABELS[targets]}{ranks}")
    if cfg.model == "mlp":
        ref_r = [r for r in REFERENCE if r != "full"]
        ax.plot([REFERENCE[r][0] for r in ref_r], [REFERENCE[r][1] for r in ref_r], "s--", color="tab:gray",
                mfc="none", label="LoRA, reference notebook (1 seed, up to ~40× our steps)")
        ax.plot(*REFERENCE["full"], "x", color="0.75", ms=8, mew=2,
                label="full finetune, reference notebook: not comparable,\na bug trained and tested it on digits 0-4")
    log_params_axis(ax)
    ax.margins(x=0.08)
    if one_target_set:
        first = lora_rows.drop_duplicates("rank")  # LoRA's counts, where DoRA's are a little higher
        top = ax.secondary_xaxis("top")
        top.set_xticks(first["trainable_params"], [str(r) for r in first["rank"]], minor=False)
        top.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        top.set_xlabel("rank r")
    ax.set_ylabel("test accuracy on digits 5-9 (task B)")
    ax.legend(loc="lower right", fontsize=8)

    difference_panel(bx, lora_rows, [method_label(r, not one_target_set) for _, r in lora_rows.iterrows()],
                     [colors[r["dora"], r["targets"]] for _, r in lora_rows.iterrows()])
    title = "MLP 784-64-64-5" if cfg.model == "mlp" else "Row transformer (transformer.py)"
    fig.suptitle(f"{title}, MNIST 0-4 → 5-9: LoRA against full finetuning, every method "
                 f"{cfg.finetune_epochs} epochs at batch size {cfg.batch_size}")
    fig.tight_layout()
    return fig


def markdown_table(results: pd.DataFrame, config: dict) -> str:
    """A README results block: the table of a results CSV and what produced it."""
    c, env = config["config"], config["environment"]
    has_dora = bool(results["dora"].fillna(False).astype(bool).any())
    lines = ["| method | trainable params | % of full's params | test accuracy on 5-9 (mean ± std) | "
             "difference to full finetuning, points (95% interval) |"
             + (" DoRA − LoRA at the same rank, points (95% interval) |" if has_dora else "")
             + " accuracy on 0-4 after finetuning | lr |",
             "|---|---:|---:|---:|---:|" + ("---:|" if has_dora else "") + "---:|---:|"]
    interval = lambda r, k: ("" if pd.isna(r[f"{k}_low"]) else
                             f"{100 * r[k]:+.2f} ({100 * r[f'{k}_low']:+.2f} to {100 * r[f'{k}_high']:+.2f})")
    for _, r in results.iterrows():
        lines.append(f"| {method_label(r, show_targets=c['model'] != 'mlp')} | {r['trainable_params']:,} | "
                     f"{r['pct_params_vs_full']:.1f} | {r['acc_B_mean']:.4f} ± {r['acc_B_std']:.4f} | "
                     f"{'' if r['method'] == 'full' else interval(r, 'diff_vs_full')} |"
                     + (f" {interval(r, 'diff_vs_lora')} |" if has_dora else "")
                     + f" {r['acc_A_after_mean']:.3f} | {r['lr']:g} |")
    images = (f"the {60_000 - c['val_size']:,} training images outside the validation split" if c["train_subset"] is None
              else f"{c['train_subset']:,} of the training images")
    lines += ["", f"{c['seeds']} seeds, {images}; every method {c['finetune_epochs']} epochs at "
              f"batch size {c['batch_size']} with Adam and a cosine schedule, after {c['pretrain_epochs']} epochs of "
              f"pretraining on 0-4, which reach {results['acc_A_pretrained_mean'].iloc[0]:.3f} on the 0-4 test set "
              f"(mean over seeds). The sweep took {config['sweep_seconds']:.0f} s on {env['device']} "
              f"({env['device_name']}, {env['cpu_threads']} threads), torch {env['torch']}."]
    return "\n".join(lines)


def readme_markers(model: str) -> tuple[str, str]:
    """The comments around each generated block of README.md."""
    name = "results" if model == "mlp" else f"{model} results"
    source = Outputs(model, Path("."))
    files = f"{source.summary.as_posix()} and {source.config.as_posix()}"
    return (f"<!-- {name}: written by `python experiment.py readme --model {model}` from {files} -->",
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


def update_readme(readme: Path, out: Outputs) -> None:
    """Replace the block between readme_markers(out.experiment) with the markdown_table of its results."""
    table = markdown_table(load_results(out), json.loads(out.config.read_text()))
    replace_readme_block(readme, readme_markers(out.experiment), table)

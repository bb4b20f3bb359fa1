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


def plot(results: pd.DataFrame, cfg: Config) -> Figure:
    """Trainable parameters (log x) against test accuracy on task B, one LoRA line per target set, full
    finetuning as a band, and for the MLP the reference notebook's table; returns the matplotlib Figure."""
    reference = REFERENCE if cfg.model == "mlp" else None
    title = "MLP 784-64-64-5" if cfg.model == "mlp" else "Row transformer (transformer.py)"

    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    full = results.set_index("method").loc["full"]
    lo, hi = full["acc_B_mean"] - full["acc_B_std"], full["acc_B_mean"] + full["acc_B_std"]
    ax.axhspan(lo, hi, color="tab:green", alpha=0.2, lw=0)
    ax.axhline(full["acc_B_mean"], color="tab:green", lw=1.5,
               label=f"full finetuning, {int(full['trainable_params']):,} params (mean ± std)")
    lora_rows = results[results["method"] != "full"]
    # Series can share a parameter count: each is nudged sideways (x 1, 0.95, 1.05), its labels too.
    styles = iter([("tab:blue", 1.0, (6, -12), "left"), ("tab:orange", 0.95, (-6, 6), "right"),
                   ("tab:purple", 1.05, (6, 6), "left")])
    for (dora, targets), rows in lora_rows.groupby(["dora", "targets"], sort=False):
        color, nudge, offset, align = next(styles)
        x = rows["trainable_params"] * nudge
        ax.errorbar(x, rows["acc_B_mean"], yerr=rows["acc_B_std"], fmt="o-", color=color, capsize=3,
                    label=f"{'DoRA' if dora else 'LoRA'} on {TARGET_LABELS[targets]} ({int(full['seeds'])} seeds, "
                          "equal budget)")
        for xi, (_, row) in zip(x, rows.iterrows()):
            ax.annotate(f"r={row['rank']}", (xi, row["acc_B_mean"]), textcoords="offset points", xytext=offset,
                        ha=align, fontsize=8, color=color)
    if reference is not None:
        ref_r = [r for r in reference if r != "full"]
        ax.plot([reference[r][0] for r in ref_r], [reference[r][1] for r in ref_r], "s--", color="tab:gray",
                mfc="none", label="LoRA, reference notebook (1 seed, up to ~40x our steps)")
        ax.plot(*reference["full"], "x", color="tab:red", ms=9, mew=2,
                label="full finetune, reference notebook (trained and tested on 0-4 by a bug)")
    ax.set_xscale("log")
    ax.margins(x=0.08)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    leading = lambda v: round(v / 10 ** math.floor(math.log10(v)))  # 2 for 2,000, 5 for 500, ...
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:,.0f}" if v > 0 and leading(v) in (2, 5) else ""))  # 2x and 5x ticks only
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy on digits 5-9 (task B)")
    ax.set_title(f"{title}, MNIST 0-4 → 5-9: LoRA against full finetuning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
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
        if r["method"] == "full":
            name = "full finetuning"
        else:
            variant = "DoRA" if r["dora"] else "LoRA"
            name = (f"{variant} r={r['rank']}" if c["model"] == "mlp" else
                    f"{variant} on {TARGET_LABELS[r['targets']]}, r={r['rank']}")
        lines.append(f"| {name} | {r['trainable_params']:,} | {r['pct_params_vs_full']:.1f} | "
                     f"{r['acc_B_mean']:.4f} ± {r['acc_B_std']:.4f} | "
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

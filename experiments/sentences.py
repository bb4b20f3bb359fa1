"""The sentences that say what a table shows, generated from its summary so that they hold for whatever a run
produces: the README's first screen (`headline`) and each MNIST experiment's findings. A sentence says what the
printed intervals say and no more: "narrows", never "closes"; a borderline or rate-sensitive verdict is named as
one that a re-run could move."""

import pandas as pd

from .report import (accuracy_column, cell_word, diverged_note, family_size, interval, markdown, method_label,
                     sensitive)


def verdict_phrase(v: str, baseline: str) -> str:
    """"is below full finetuning", "is below LoRA but within ±0.5 points of it", "is within ±0.5 points of LoRA",
    "is not distinguishable from full finetuning", each with "(borderline)" kept; "" for no verdict."""
    if not isinstance(v, str) or not v:
        return ""
    word, borderline = v.removesuffix(" (borderline)"), v.endswith(" (borderline)")
    side, _, within = word.partition(", ")
    if word == "not distinguishable":
        phrase = f"is not distinguishable from {baseline}"
    elif word.startswith("within"):
        phrase = f"is {word} {unit(word)} of {baseline}"
    elif within:
        phrase = f"is {side} {baseline} but {within} {unit(within)} of it"
    else:
        phrase = f"is {side} {baseline}"
    return phrase + (" (borderline)" if borderline else "")


def unit(within: str) -> str:
    """"point" after "within ±1", else "points"."""
    return "point" if within.endswith("±1") else "points"


def verdict_lines(results: pd.DataFrame, show_targets: bool = True) -> str:
    """Full finetuning's accuracy, then one line per other method: its accuracy, its share of full's trainable
    parameters, and its paired difference to full finetuning with the verdict that interval allows."""
    acc = accuracy_column(results)
    full = results.set_index("method").loc["full"]
    lines = [f"full finetuning: {full[f'{acc}_mean']:.4f} ± {full[f'{acc}_std']:.4f} with "
             f"{int(full['trainable_params']):,} trainable parameters"]
    for _, r in results[results["method"] != "full"].iterrows():
        word = verdict_phrase(r["verdict_vs_full"], "full finetuning") or "failed on some seeds: no verdict"
        lines.append(f"{method_label(r, show_targets)}: {r[f'{acc}_mean']:.4f} ± {r[f'{acc}_std']:.4f} "
                     f"({int(r['trainable_params']):,} parameters, {r['pct_params_vs_full']:.2f}% of full's): {word}"
                     + ("; rate-sensitive" if sensitive(r["rate_sensitive_vs_full"]) else "")
                     + f" ({interval(r['diff_vs_full'], r['diff_vs_full_low'], r['diff_vs_full_high'])} points)")
    return "\n".join(lines)


def _against(rows: pd.DataFrame, against: str, baseline: str) -> str:
    """"is below full finetuning at ranks 1 and 2, is below it but within ±0.5 points of it at rank 8": each
    rank's verdict (the column verdict_<against>), grouped, a rate-sensitive one marked."""
    groups = {}
    for _, r in rows.iterrows():
        mark = "*" if sensitive(r[f"rate_sensitive_{against}"]) else ""
        groups.setdefault(r[f"verdict_{against}"], []).append(f"{int(r['rank'])}{mark}")
    parts = [f"{verdict_phrase(v, baseline if i == 0 else 'it')} at {_ranks(ranks)}"
             for i, (v, ranks) in enumerate(groups.items())]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def _ranks(ranks: list[str]) -> str:
    """"rank 4", "ranks 1, 2* and 4" (a "*": rate-sensitive), or "no rank"."""
    if len(ranks) < 2:
        return f"rank {ranks[0]}" if ranks else "no rank"
    return "ranks " + ", ".join(ranks[:-1]) + " and " + ranks[-1]


def caveats(rows: pd.DataFrame, against: str) -> str:
    """A sentence on the verdicts a re-run could move: the borderline ones and the rate-sensitive (*) ones."""
    borderline = rows[rows[f"verdict_{against}"].str.endswith("(borderline)")]
    sensitive = rows[rows[f"rate_sensitive_{against}"].astype(bool)]
    parts = []
    verb = lambda n: "is" if n == 1 else "are"
    if len(borderline):
        parts.append(f"{len(borderline)} of these {len(rows)} verdicts {verb(len(borderline))} borderline (an "
                     "adjusted p within a factor of 3 of 0.05)")
    if len(sensitive):
        parts.append(f"{len(sensitive)} {verb(len(sensitive))} rate-sensitive (*: the runner-up learning rate of the "
                     "method or of what it is compared with gives another verdict)")
    n = len(set(borderline.index) | set(sensitive.index))
    return (" " + "; ".join(parts) + f": a re-run on new seeds could move {'it' if n == 1 else 'them'}.") if parts else ""


def trend(rows: pd.DataFrame) -> str:
    """How the gap to full finetuning moves from the smallest rank to the largest: "narrows" or "widens" where the
    two intervals do not overlap, else "does not clearly change"; with the gaps in points."""
    lo, hi = rows.iloc[0], rows.iloc[-1]
    gaps = ", ".join(f"{-100 * r['diff_vs_full']:.2f} at rank {int(r['rank'])}" for _, r in rows.iterrows()
                     if r["rank"] in (lo["rank"], 8, hi["rank"]))
    if hi["diff_vs_full_low"] > lo["diff_vs_full_high"]:
        word = "narrows"
    elif hi["diff_vs_full_high"] < lo["diff_vs_full_low"]:
        word = "widens"
    else:
        word = "does not clearly change"
    return f"the gap to full finetuning {word} from rank {int(lo['rank'])} to rank {int(hi['rank'])} (in points: {gaps})"


def headline(results: pd.DataFrame) -> str:
    """The README's first screen: full finetuning and LoRA at every rank (trainable parameters, test accuracy,
    the paired difference to full finetuning with its verdict), then sentences on what it shows: LoRA against
    full finetuning, DoRA and QLoRA against LoRA, every number read off `results` (an MLP summary)."""
    acc = accuracy_column(results)
    full = results.set_index("method").loc["full"]
    variant = results["dora"].astype(bool) | results["nf4"].astype(bool)
    lora = results[(results["method"] != "full") & ~variant]
    rows = [["full finetuning", f"{int(full['trainable_params']):,}",
             f"{full[f'{acc}_mean']:.4f} ± {full[f'{acc}_std']:.4f}", ""]]
    for _, r in lora.iterrows():
        word = cell_word(r["verdict_vs_full"], r["rate_sensitive_vs_full"]) or "no verdict"
        rows.append([method_label(r, False), f"{int(r['trainable_params']):,} ({r['pct_params_vs_full']:.1f}%)",
                     f"{r[f'{acc}_mean']:.4f} ± {r[f'{acc}_std']:.4f}" + diverged_note(r),
                     f"{interval(r['diff_vs_full'], r['diff_vs_full_low'], r['diff_vs_full_high'])}: {word}"])
    m = family_size(results, "vs_full")
    table = markdown(pd.DataFrame(rows, columns=[
        "method", "trainable parameters (% of full's)", "test accuracy on digits 5-9 (mean ± std)",
        f"difference to full finetuning, points (95% interval, simultaneous over all {m} comparisons with it): "
        "verdict"]))
    first = lora.iloc[0]
    out = [f"LoRA at rank {int(first['rank'])} trains {int(first['trainable_params']):,} parameters, "
           f"{first['pct_params_vs_full']:.1f}% of full finetuning's {int(full['trainable_params']):,}, and reaches "
           f"{first[f'{acc}_mean']:.3f} against full finetuning's {full[f'{acc}_mean']:.3f}."]
    sound = lora[lora["verdict_vs_full"].map(cell_word) != ""]
    if len(sound) > 1:
        out.append(f"Over {int(full['seeds'])} seeds, {trend(sound)}; with every interval widened for the {m} "
                   f"comparisons with full finetuning, LoRA {_against(sound, 'vs_full', 'full finetuning')}."
                   + caveats(sound, "vs_full"))
    floor = sound["floor_vs_full"].dropna()
    if len(floor):
        out.append(f"The test set alone leaves ±{100 * floor.min():.2f} to ±{100 * floor.max():.2f} points on "
                   "these differences, however many seeds run.")
    for name, kind, what in (("DoRA", "dora", "LoRA plus a trained length per output row of W"),
                             ("QLoRA", "nf4", "LoRA over the hidden layers stored in 4-bit NF4")):
        judged = results[results[kind].astype(bool) & (results["verdict_vs_lora"].map(cell_word) != "")]
        if len(judged):
            below = int((judged["diff_vs_lora"] < 0).sum())
            out.append(f"Compared rank by rank with LoRA over the same seeds, {name} ({what}) "
                       f"{_against(judged, 'vs_lora', 'LoRA')}; {below} of its {len(judged)} estimates "
                       f"{'is' if below == 1 else 'are'} below LoRA's." + caveats(judged, "vs_lora"))
    return table + "\n\n" + " ".join(out)


def findings(results: pd.DataFrame, show_targets: bool = True) -> str:
    """What an MNIST table shows, per series: its verdicts against full finetuning, the smallest rank whose
    interval lies within the margin, where its means flatten; DoRA and QLoRA against LoRA. Every verdict is
    Bonferroni-corrected within its family (one column of the table)."""
    acc = accuracy_column(results)
    full = results.set_index("method").loc["full"]
    sound = results[results["verdict_vs_full"].map(cell_word) != ""]  # neither full finetuning nor a failed row
    n = int(full["seeds"])
    out = [f"Paired over {n} seeds, each interval with the test set's noise as well as the seeds', and "
           f"simultaneous over the {len(sound)} comparisons with full finetuning (full finetuning: "
           f"{full[f'{acc}_mean']:.4f}):"]
    for _, rows in sound.groupby(["targets", "dora", "nf4"], sort=False):  # one series per target set and kind
        name = method_label(rows.iloc[0], show_targets).rsplit(" r=", 1)[0].rstrip(",")
        s = f"{name} {_against(rows, 'vs_full', 'full finetuning')}."
        close = rows[rows["verdict_vs_full"].str.contains("within")]
        if len(close):
            c = close.iloc[0]
            s += (f" The smallest rank whose interval lies within the margin is {int(c['rank'])} "
                  f"({c['pct_params_vs_full']:.0f}% of full finetuning's parameters, "
                  f"{interval(c['diff_vs_full'], c['diff_vs_full_low'], c['diff_vs_full_high'])} points).")
        gap = rows[f"{acc}_mean"].max() - rows[f"{acc}_mean"]  # below the series' best mean
        flat_from = min((k for k in rows["rank"] if (gap[rows["rank"] >= k] <= 0.0025).all()), default=None)
        flat = rows[rows["rank"] >= flat_from] if flat_from is not None else rows.iloc[:0]
        if len(flat) > 1:
            s += (f" From rank {int(flat_from)} on its means lie within a quarter point of its best "
                  f"({flat[f'{acc}_mean'].min():.4f} to {flat[f'{acc}_mean'].max():.4f}).")
        out.append(s + caveats(rows, "vs_full"))
    for name, kind in (("DoRA", "dora"), ("QLoRA", "nf4")):
        judged = results[results[kind].astype(bool) & (results["verdict_vs_lora"].map(cell_word) != "")]
        if len(judged):
            out.append(f"{name} against LoRA at the same rank ({family_size(results, 'vs_lora')} paired comparisons "
                       f"in that column): {name} {_against(judged, 'vs_lora', 'LoRA')}." + caveats(judged, "vs_lora"))
    return " ".join(out[:1] + failed_rows(results, show_targets) + out[1:])


def failed_rows(results: pd.DataFrame, show_targets: bool = True) -> list[str]:
    """A sentence for each method some of whose seeds failed (a "diverged_mean" column: the share of its seeds
    that diverged or never learned): it is marked, and no verdict or other sentence speaks of it."""
    if "diverged_mean" not in results:
        return []
    out = []
    for _, r in results[results["diverged_mean"] > 0].iterrows():
        n = int(r["seeds"])
        out.append(f"{method_label(r, show_targets)} failed on {round(r['diverged_mean'] * n)} of {n} seeds at its "
                   f"learning rate {r['lr']:g} (its training loss rose or its validation accuracy stayed near "
                   "chance): its row is marked, and no verdict or sentence here rests on it.")
    return out

"""Reporting any experiment: the summary over seeds (one column schema), how an interval and a verdict read,
the results table, and the README's generated blocks."""

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .methods import TARGET_SET_LABELS, Method
from .stats import holm, paired_differences, verdict as verdict_of
from .storage import atomic_write, with_int_columns


# The selection rule of protocol.py in two sentences, as the README and the notebooks print it (a test checks it).
RULE = ("Every method trains at every learning rate of its grid on three tuning seeds (100, 101, 102), scored on the "
        "validation split as counts of correct examples; a rate at which any tuning seed's training loss ended at "
        "chance level (it diverged, or never learned) is out. Among the rest the smallest rate whose mean "
        "lies within one standard error of the best rate's is chosen, and where the best rate sits at an end of "
        "the grid, the grid grows a half-decade that way and is tuned again (at most two steps each way).")


def summarize(per_seed: pd.DataFrame, methods: list[Method], metric: str, extra_means: tuple[str, ...] = (),
              budget: Mapping[str, object] | None = None) -> pd.DataFrame:
    """One row per method, every experiment with the same columns: method, rank, targets, dora, alpha,
    trainable_params, pct_params_vs_full, {metric}_mean, {metric}_std, pct_acc_vs_full, the paired difference
    (same seeds, 95% interval, stats.difference) to full finetuning (diff_vs_full, _low, _high, p_vs_full,
    p_match_vs_full) with its Holm-corrected verdict (verdict_vs_full) and, for DoRA, likewise to LoRA at the
    same rank (..._vs_lora), the mean of each of `extra_means`, seeds, the `budget` (epochs, batch size, ...)
    and lr. `metric` is the per-seed column of test accuracy; a "diverged" column (bool per run) keeps a method
    out of the verdicts."""
    per_seed = per_seed.assign(dora=per_seed["dora"] if "dora" in per_seed else False)
    g = per_seed.groupby("method", sort=False)
    out = g.agg(rank=("rank", "first"), targets=("targets", "first"), dora=("dora", "first"), alpha=("alpha", "first"),
                trainable_params=("trainable_params", "first"), **{f"{metric}_mean": (metric, "mean"),
                f"{metric}_std": (metric, "std")}, **{f"{c}_mean": (c, "mean") for c in extra_means},
                seeds=("seed", "count"), lr=("lr", "first")).reset_index()
    full = out.set_index("method").loc["full"]
    out["pct_params_vs_full"] = 100 * out["trainable_params"] / full["trainable_params"]
    out["pct_acc_vs_full"] = 100 * out[f"{metric}_mean"] / full[f"{metric}_mean"]
    vs_full = paired_differences(per_seed, metric, "full").set_index("method").loc[out["method"]]
    out[["diff_vs_full", "diff_vs_full_low", "diff_vs_full_high", "p_vs_full", "p_match_vs_full"]] = vs_full[
        ["diff_mean", "diff_low", "diff_high", "p", "p_match"]].to_numpy()
    lora_twin = {m.name: dataclasses.replace(m, dora=False).name for m in methods if m.dora}
    nan5 = [math.nan] * 5

    def vs_lora(name: str) -> list[float]:
        if name not in lora_twin:
            return nan5
        d = paired_differences(per_seed, metric, lora_twin[name]).set_index("method").loc[name]
        return d[["diff_mean", "diff_low", "diff_high", "p", "p_match"]].tolist()

    out[["diff_vs_lora", "diff_vs_lora_low", "diff_vs_lora_high", "p_vs_lora", "p_match_vs_lora"]] = [
        vs_lora(n) for n in out["method"]]
    # No verdict on a row with a diverged seed, nor on DoRA against such a LoRA: they are left out of the families.
    bad = set(per_seed.loc[per_seed["diverged"].astype(bool), "method"]) if "diverged" in per_seed else set()
    out["verdict_vs_full"] = family_verdicts(out, "vs_full", ~out["method"].isin(bad | {"full"}))
    twin_bad = out["method"].map(lambda n: lora_twin.get(n) in bad)
    out["verdict_vs_lora"] = family_verdicts(out, "vs_lora", out["method"].isin(lora_twin) & ~out["method"].isin(bad)
                                             & ~twin_bad)
    for k, v in (budget or {}).items():
        out[k] = v
    columns = ["method", "rank", "targets", "dora", "alpha", "trainable_params", "pct_params_vs_full",
               f"{metric}_mean", f"{metric}_std", "pct_acc_vs_full", "diff_vs_full", "diff_vs_full_low",
               "diff_vs_full_high", "p_vs_full", "p_match_vs_full", "verdict_vs_full", "diff_vs_lora",
               "diff_vs_lora_low", "diff_vs_lora_high", "p_vs_lora", "p_match_vs_lora", "verdict_vs_lora",
               *(f"{c}_mean" for c in extra_means), "seeds", *(budget or {}), "lr"]
    return with_int_columns(out[columns])


def family_verdicts(out: pd.DataFrame, against: str, member: pd.Series) -> list[str]:
    """The verdict of each row of one family (the rows where `member`; e.g. every method against full
    finetuning), both p-values Holm-adjusted over that family; "" outside it."""
    p = holm(out.loc[member, f"p_{against}"].tolist())
    p_match = holm(out.loc[member, f"p_match_{against}"].tolist())
    verdicts = pd.Series("", index=out.index, dtype=object)
    verdicts[member] = [verdict_of(a, b, m) for a, b, m in zip(p, p_match, out.loc[member, f"diff_{against}"])]
    return verdicts.tolist()


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


def cell_word(v) -> str:
    """A verdict as a table cell: "below", "matches", "not distinguishable"; "" for none (NaN read from a CSV)."""
    return v.removesuffix(" from") if isinstance(v, str) else ""


def verdict_phrase(v: str, baseline: str) -> str:
    """"matches full finetuning (within ±1 point)", "below full finetuning", "not distinguishable from LoRA"."""
    if not isinstance(v, str) or not v:  # no verdict (read back from a CSV: NaN)
        return ""
    return {"matches": f"matches {baseline} (within ±1 point)"}.get(v, f"is {v} {baseline}")


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
                     f"{verdict_phrase(r['verdict_vs_full'], 'full finetuning') or 'diverged on some seeds: no verdict'}"
                     f" ({interval(r['diff_vs_full'], r['diff_vs_full_low'], r['diff_vs_full_high'])} points)")
    return "\n".join(lines)


def table(results: pd.DataFrame, show_targets: bool = True, accuracy: str = "test accuracy",
          extra: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The results as text cells: method, trainable params, % of full's params, accuracy (mean ± std, marked where
    seeds diverged), the difference to full finetuning (95% interval) and its Holm-corrected verdict, DoRA − LoRA
    likewise where DoRA ran, each `extra` column
    ({header: summary column, shown to 3 decimals}) and the learning rate."""
    acc = accuracy_column(results)
    has_dora = bool(results["dora"].fillna(False).astype(bool).any())
    cells = {"method": [method_label(r, show_targets) for _, r in results.iterrows()],
             "trainable params": results["trainable_params"].map("{:,}".format),
             "% of full's params": results["pct_params_vs_full"].map(lambda v: f"{v:.1f}" if v >= 0.95 else f"{v:.2g}"),
             f"{accuracy} (mean ± std)": [f"{m:.4f} ± {s:.4f}" + diverged_note(r) for (_, r), m, s in
                                           zip(results.iterrows(), results[f"{acc}_mean"], results[f"{acc}_std"])],
             "difference to full finetuning, points (95% interval)": [
                 interval(*v) for v in zip(results.diff_vs_full, results.diff_vs_full_low, results.diff_vs_full_high)],
             "against full finetuning": results["verdict_vs_full"].map(cell_word).tolist()}
    if has_dora:
        cells["DoRA − LoRA at the same rank, points (95% interval)"] = [
            interval(*v) for v in zip(results.diff_vs_lora, results.diff_vs_lora_low, results.diff_vs_lora_high)]
        cells["DoRA against LoRA"] = results["verdict_vs_lora"].map(cell_word).tolist()
    for header, column in (extra or {}).items():
        cells[header] = results[column].map("{:.3f}".format)
    cells["lr"] = results["lr"].map("{:g}".format)
    return pd.DataFrame(cells)


def diverged_note(row) -> str:
    """", 3 of 5 seeds diverged" where some did (a diverged_mean column), so that a mean pulled down by them is
    marked in the table itself."""
    share = row.get("diverged_mean", 0)
    return f", {round(share * row['seeds'])} of {int(row['seeds'])} seeds diverged" if share and share > 0 else ""


def markdown(cells: pd.DataFrame) -> str:
    """A plain markdown table of text cells, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(cells.columns) + " |", "|---|" + "---:|" * (len(cells.columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines)


def machine(env: dict) -> str:
    """Which machine made a table, from a config's environment: "cpu (AMD EPYC, torch's AVX512 kernels), torch
    2.14.1" or "cuda (NVIDIA H200, CUDA 13.0), torch 2.11.0"; the CPU's vector extensions in full are in the
    config file."""
    if env["device"].startswith("cuda"):
        what = env["device_name"] + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
    else:
        kernels = env.get("cpu_vector_extensions", "").rpartition("torch dispatches ")[2]
        what = env.get("cpu", env["device_name"]) + (f", torch's {kernels} kernels" if kernels else "")
    return f"{env['device']} ({what}), torch {env['torch']}"


def readme_markers(experiment: str, block: str = "results") -> tuple[str, str]:
    """The comments around a generated block of README.md: an experiment's results, or the MLP's "headline"
    (the first screen's table and sentences) and "time" (how long the runs take)."""
    name = block if experiment == "mlp" else f"{experiment} {block}"
    return (f"<!-- {name}: written by `python -m experiments readme --experiment {experiment}` -->",
            f"<!-- end of {name} -->")


def headline(results: pd.DataFrame) -> str:
    """The README's first screen: full finetuning and LoRA at every rank (method, trainable parameters, test
    accuracy, the paired difference to full finetuning with its verdict), then three sentences on what it shows,
    every number read off `results` (an MLP summary)."""
    acc = accuracy_column(results)
    full = results.set_index("method").loc["full"]
    lora = results[(results["method"] != "full") & ~results["dora"].astype(bool)]
    dora = results[results["dora"].astype(bool)]
    rows = [["full finetuning", f"{int(full['trainable_params']):,}", f"{full[f'{acc}_mean']:.4f} ± {full[f'{acc}_std']:.4f}",
             ""]]
    for _, r in lora.iterrows():
        word = cell_word(r["verdict_vs_full"]) or "no verdict"
        rows.append([method_label(r, False), f"{int(r['trainable_params']):,} ({r['pct_params_vs_full']:.1f}%)",
                     f"{r[f'{acc}_mean']:.4f} ± {r[f'{acc}_std']:.4f}" + diverged_note(r),
                     f"{interval(r['diff_vs_full'], r['diff_vs_full_low'], r['diff_vs_full_high'])}: {word}"])
    table = markdown(pd.DataFrame(rows, columns=["method", "trainable parameters (% of full's)",
                                                 "test accuracy on digits 5-9 (mean ± std)",
                                                 "difference to full finetuning, points (95% interval): "
                                                 "Holm-corrected verdict"]))
    first = lora.iloc[0]
    one = (f"LoRA at rank {int(first['rank'])} trains {int(first['trainable_params']):,} parameters, "
           f"{first['pct_params_vs_full']:.1f}% of full finetuning's {int(full['trainable_params']):,}, and reaches "
           f"{first[f'{acc}_mean']:.3f} against full finetuning's {full[f'{acc}_mean']:.3f}.")
    sound = lora[lora["verdict_vs_full"].map(cell_word) != ""]
    gaps = ", ".join(f"{-100 * r['diff_vs_full']:.2f} at rank {int(r['rank'])}" for _, r in sound.iterrows()
                     if r["rank"] in (sound["rank"].min(), 8, sound["rank"].max()))
    two = (f"The gap to full finetuning closes as the rank grows (in points: {gaps}); after correcting for the "
           f"{(results['verdict_vs_full'].map(cell_word) != '').sum()} comparisons with it (LoRA's and DoRA's), LoRA "
           f"{_against(sound, 'vs_full', 'full finetuning')}.")
    three = ""
    judged = dora[dora["verdict_vs_lora"].map(cell_word) != ""]
    if len(judged):
        three = (f"Compared rank by rank, DoRA (LoRA plus a trained length per output row of W) "
                 f"{_against(judged, 'vs_lora', 'LoRA')}.")
    return table + "\n\n" + " ".join(x for x in (one, two, three) if x)


def run_times(path: Path) -> str:
    """How long the runs take, each with its machine and conditions, from results/run_times.json (written by
    bench/time_make_run.py and bench/notebook_time.py, never by `make run`)."""
    if not Path(path).is_file():
        return "No run has been timed yet (bench/time_make_run.py)."
    entries = json.loads(Path(path).read_text())
    return " ".join(f"{e['what']}: {_duration(e['seconds'])} on {e['machine']} ({e['conditions']}; {e['date']})."
                    for e in entries.values())


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


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


def _against(rows: pd.DataFrame, against: str, baseline: str) -> str:
    """"matches <baseline> (within ±1 point) at rank 8, is below it at ranks 1 and 2": each rank's Holm-corrected
    verdict (the column verdict_<against>), grouped."""
    groups = {}
    for _, r in rows.iterrows():
        groups.setdefault(r[f"verdict_{against}"], []).append(r["rank"])
    parts = [f"{verdict_phrase(v, baseline if i == 0 else 'it')} at {_ranks(ranks)}"
             for i, (v, ranks) in enumerate(groups.items())]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def findings(results: pd.DataFrame, show_targets: bool = True) -> str:
    """The sentences that state what an MNIST table shows, generated from it so that they hold for whatever a
    run produces: a word on each row whose seeds diverged (no other sentence uses it), each series' verdicts
    against full finetuning, the smallest rank that matches it, where the curve flattens, and DoRA against LoRA.
    Verdicts are Holm-corrected within their family (one column of the table)."""
    acc = accuracy_column(results)
    full = results.set_index("method").loc["full"]
    sound = results[results["verdict_vs_full"].map(cell_word) != ""]  # neither full finetuning nor a diverged row
    dora = sound[sound["dora"].astype(bool) & (sound["verdict_vs_lora"].map(cell_word) != "")]
    n = int(full["seeds"])
    out = [f"Paired over {n} seeds, each interval with the test set's noise as well as the seeds'; verdicts "
           f"Holm-corrected over the {len(sound)} comparisons with full finetuning (full finetuning: "
           f"{full[f'{acc}_mean']:.4f}):"]
    for _, rows in sound.groupby(["targets", "dora"], sort=False):  # one series per target set and kind
        name = method_label(rows.iloc[0], show_targets).rsplit(" r=", 1)[0].rstrip(",")
        s = f"{name} {_against(rows, 'vs_full', 'full finetuning')}."
        close = rows[rows["verdict_vs_full"] == "matches"]
        if len(close):
            c = close.iloc[0]
            s += (f" The smallest rank that matches it is {int(c['rank'])} ({c['pct_params_vs_full']:.0f}% of its "
                  f"parameters, {interval(c['diff_vs_full'], c['diff_vs_full_low'], c['diff_vs_full_high'])} points).")
        else:
            s += " No rank matches it within ±1 point."
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
        decided = dora[dora["verdict_vs_lora"].isin(["above", "below"])]
        out.append(f"DoRA against LoRA at the same rank (Holm-corrected over {len(dora)} paired comparisons): DoRA "
                   f"{_against(dora, 'vs_lora', 'LoRA')}"
                   + (" (" + "; ".join(f"r={int(r['rank'])}: " + interval(r['diff_vs_lora'], r['diff_vs_lora_low'],
                                                                          r['diff_vs_lora_high'])
                                      for _, r in decided.iterrows()) + " points)" if len(decided) else "") + ".")
    return " ".join(out[:1] + diverged(results, show_targets) + out[1:])


def diverged(results: pd.DataFrame, show_targets: bool = True) -> list[str]:
    """A sentence for each method some of whose seeds diverged (a "diverged_mean" column: the share of its seeds
    whose training loss ended at chance level): it is marked, and no verdict or other sentence speaks of it."""
    if "diverged_mean" not in results:
        return []
    out = []
    for _, r in results[results["diverged_mean"] > 0].iterrows():
        n = int(r["seeds"])
        out.append(f"{method_label(r, show_targets)} diverged on {round(r['diverged_mean'] * n)} of {n} seeds at "
                   f"its learning rate {r['lr']:g} (their training loss ended at chance level): its row is marked, "
                   f"and no verdict or sentence here rests on it.")
    return out

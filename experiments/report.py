"""Reporting any experiment: the summary over seeds (one column schema), how an interval and a verdict read,
the results table, and the README's generated blocks."""

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from .methods import TARGET_SET_LABELS, Method
from .stats import family, paired_differences
from .storage import atomic_write, with_int_columns


# The selection rule of protocol.py in three sentences, as the README and the notebooks print it (a test checks it).
RULE = ("Every method trains at every learning rate of its grid on its tuning seeds (100, 101, ...), scored on the "
        "validation split as counts of correct examples. A rate is out where a tuning seed's training loss is not "
        "finite or ended above where it started, or where the seeds disagree (the worst less than half as far "
        "above chance as the best): diverged; or where the mean validation accuracy is still within a tenth of "
        "the way from chance to perfect: too slow. Among the rest the highest total count wins (the smaller rate "
        "on a tie), a runner-up within one standard error of the per-seed difference is swept too as a "
        "sensitivity row, and the grid grows a half-decade up where the best rate is its top or every rate is too "
        "slow, down where the best is its bottom or every rate diverged (at most two steps each way).")


def summarize(per_seed: pd.DataFrame, methods: list[Method], metric: str, margin: float,
              extra_means: tuple[str, ...] = (), budget: Mapping[str, object] | None = None) -> pd.DataFrame:
    """One row per method, every experiment with the same columns: method, rank, targets, dora, nf4, alpha,
    trainable_params, pct_params_vs_full, {metric}_mean, {metric}_std, pct_acc_vs_full; the paired difference
    (same seeds, stats.difference) to full finetuning with its simultaneous interval, adjusted p-values, the test
    set's floor and verdict (diff_vs_full, _low, _high, p_vs_full, p_match_vs_full, floor_vs_full,
    verdict_vs_full, rate_sensitive_vs_full) and, for DoRA and QLoRA, likewise to LoRA at the same rank
    (..._vs_lora); the mean of each of `extra_means`, seeds, the `budget` (epochs, batch size, ...), lr, and
    lr_runner_up where a near tie was swept too. `metric` is the per-seed column of test accuracy; a
    "diverged" column (bool per run) keeps a method out of the verdicts; a "runner_up" column marks the runs at
    a method's runner-up rate, which decide only rate_sensitive_*: whether the verdict differs there."""
    per_seed = per_seed.assign(dora=per_seed["dora"] if "dora" in per_seed else False,
                               nf4=per_seed["nf4"] if "nf4" in per_seed else False)
    runner_up = per_seed["runner_up"].astype(bool) if "runner_up" in per_seed else pd.Series(False, per_seed.index)
    alt, per_seed = per_seed[runner_up], per_seed[~runner_up]
    g = per_seed.groupby("method", sort=False)
    out = g.agg(rank=("rank", "first"), targets=("targets", "first"), dora=("dora", "first"), nf4=("nf4", "first"),
                alpha=("alpha", "first"), trainable_params=("trainable_params", "first"),
                **{f"{metric}_mean": (metric, "mean"), f"{metric}_std": (metric, "std")},
                **{f"{c}_mean": (c, "mean") for c in extra_means}, seeds=("seed", "count"),
                lr=("lr", "first")).reset_index()
    full = out.set_index("method").loc["full"]
    out["pct_params_vs_full"] = 100 * out["trainable_params"] / full["trainable_params"]
    out["pct_acc_vs_full"] = 100 * out[f"{metric}_mean"] / full[f"{metric}_mean"]
    twin = {m.name: dataclasses.replace(m, dora=False, nf4=False).name for m in methods if m.dora or m.nf4}
    bad = set(per_seed.loc[per_seed["diverged"].astype(bool), "method"]) if "diverged" in per_seed else set()
    baselines = {"vs_full": {n: "full" for n in out["method"] if n != "full"}, "vs_lora": twin}
    for against, baseline in baselines.items():
        # No verdict on a row with a diverged seed, nor against such a baseline: they are left out of the family.
        members = [n for n in out["method"] if n in baseline and n not in bad and baseline[n] not in bad]
        fam = family_table(per_seed, metric, members, baseline, margin)
        for src, name in column_names(against).items():
            out[name] = out["method"].map(fam[src]).astype(float)
        out[f"verdict_{against}"] = out["method"].map(fam["verdict"]).astype(object).fillna("")
        out[f"rate_sensitive_{against}"] = [
            n in fam.index and rate_sensitive(per_seed, alt, metric, n, baseline[n], len(members), margin)
            for n in out["method"]]
    out["lr_runner_up"] = out["method"].map(alt.groupby("method")["lr"].first()).astype(float)
    for k, v in (budget or {}).items():
        out[k] = v
    columns = ["method", "rank", "targets", "dora", "nf4", "alpha", "trainable_params", "pct_params_vs_full",
               f"{metric}_mean", f"{metric}_std", "pct_acc_vs_full",
               *(c for a in baselines for c in [*column_names(a).values(), f"verdict_{a}", f"rate_sensitive_{a}"]),
               *(f"{c}_mean" for c in extra_means), "seeds", *(budget or {}), "lr", "lr_runner_up"]
    return with_int_columns(out[columns])


def runner_up_rows(per_seed: pd.DataFrame, summarize) -> pd.DataFrame:
    """The summary row of each method that has a runner-up rate, at that rate: `summarize` (an experiment's,
    taking a per-seed table) on the reported runs with that one method's runner-up runs in place of its chosen
    ones, every other method at its chosen rate. Empty where no method has a runner-up."""
    if "runner_up" not in per_seed or not per_seed["runner_up"].astype(bool).any():
        return pd.DataFrame()
    alt = per_seed["runner_up"].astype(bool)
    rows = []
    for method in per_seed.loc[alt, "method"].drop_duplicates():
        mine = per_seed["method"] == method
        swapped = per_seed[(mine & alt) | (~mine & ~alt)].assign(runner_up=False)
        rows.append(summarize(swapped).loc[lambda d: d["method"] == method])
    return pd.concat(rows, ignore_index=True)


def column_names(against: str) -> dict[str, str]:
    """stats.family's columns -> the summary's, for one family ("vs_full", "vs_lora")."""
    return {"diff_mean": f"diff_{against}", "diff_low": f"diff_{against}_low", "diff_high": f"diff_{against}_high",
            "p": f"p_{against}", "p_match": f"p_match_{against}", "floor": f"floor_{against}"}


def family_table(per_seed: pd.DataFrame, metric: str, members: list[str], baseline: dict[str, str],
                 margin: float) -> pd.DataFrame:
    """stats.family over the paired differences of `members`, each against baseline[member]; indexed by method
    (empty, with every column, for an empty family)."""
    if not members:
        return pd.DataFrame(columns=["diff_mean", "diff_low", "diff_high", "p", "p_match", "floor", "verdict"])
    rows = pd.concat([paired_differences(per_seed[per_seed["method"].isin([n, baseline[n]])], metric,
                                         baseline[n]).set_index("method").loc[[n]] for n in members])
    return rows[["diff_mean"]].join(family(rows, margin))


def rate_sensitive(per_seed: pd.DataFrame, alt: pd.DataFrame, metric: str, method: str, baseline: str, m: int,
                   margin: float) -> bool:
    """Whether `method`'s verdict against `baseline` changes where either runs at its runner-up rate instead (a
    near tie on validation, swept too): the same family size m, so the same level."""
    sides = [[per_seed[per_seed["method"] == n]] + ([alt[alt["method"] == n]] if (alt["method"] == n).any() else [])
             for n in (method, baseline)]
    words = set()
    for a in sides[0]:
        for b in sides[1]:
            d = paired_differences(pd.concat([a, b]), metric, baseline).set_index("method").loc[[method]]
            words.add(family(d, margin, m=m)["verdict"].iloc[0].removesuffix(" (borderline)"))
    return len(words) > 1


def accuracy_column(results: pd.DataFrame) -> str:
    """The summary's test-accuracy prefix: "acc_B" where the column is acc_B_mean."""
    (mean,) = [c for c in results.columns if c.endswith("_mean") and f"{c[:-5]}_std" in results.columns]
    return mean[:-5]


def method_label(row, show_targets: bool = True) -> str:
    """How a method reads in tables and figures: "full finetuning", "LoRA r=4", "DoRA on Wq, Wv, r=4",
    "QLoRA r=8" (LoRA over the 4-bit base)."""
    if row["method"] in ("full", "head"):
        return {"full": "full finetuning", "head": "linear probe (head only)"}[row["method"]]
    on = f" on {TARGET_SET_LABELS[row['targets']]}," if show_targets else ""
    kind = "DoRA" if bool(row.get("dora", False)) else "QLoRA" if bool(row.get("nf4", False)) else "LoRA"
    return f"{kind}{on} r={row['rank']}"


def interval(mean: float, low: float, high: float) -> str:
    """A difference in points with its interval, "-1.23 (-2.00 to -0.46)"; blank where there is no interval
    (full finetuning against itself, a single seed, a row left out of its family)."""
    if pd.isna(low) or (low, high) == (0, 0):
        return ""
    return f"{100 * mean:+.2f} ({100 * low:+.2f} to {100 * high:+.2f})"


def points(share: float) -> str:
    """A margin as the README says it: "±0.5 points", "±1 point"."""
    return f"±{100 * share:g} point{'' if 100 * share == 1 else 's'}"


def sensitive(flag) -> bool:
    """A rate_sensitive_* cell as a bool: True, 1 or 1.0 (as a CSV reads it back), never NaN or a missing value."""
    return flag is True or flag == 1


def cell_word(v, rate_sensitive=False) -> str:
    """A verdict as a table cell: "below, within ±0.5", "not distinguishable (borderline)", with "; rate-sensitive"
    where the runner-up rate gives another verdict; "" for none (NaN read back from a CSV)."""
    if not isinstance(v, str) or not v:
        return ""
    return v + ("; rate-sensitive" if sensitive(rate_sensitive) else "")


def family_size(results: pd.DataFrame, against: str) -> int:
    """How many comparisons a family holds: the rows with a verdict in that column (the Bonferroni m)."""
    return int((results[f"verdict_{against}"].map(cell_word) != "").sum())


def table(results: pd.DataFrame, show_targets: bool = True, accuracy: str = "test accuracy",
          extra: Mapping[str, str] | None = None, runner_up: pd.DataFrame | None = None) -> pd.DataFrame:
    """The results as text cells: method, trainable params, % of full's params, accuracy (mean ± std, marked where
    seeds failed), the difference to full finetuning with its simultaneous interval (the level its verdict uses)
    and verdict, the difference to LoRA at the same rank likewise where DoRA or QLoRA ran, each `extra` column
    ({header: summary column, shown to 3 decimals}) and the learning rate; then each runner-up row (a near tie
    on validation, swept on the same seeds), labelled."""
    rows = results if runner_up is None or runner_up.empty else pd.concat(
        [results, runner_up.assign(label_suffix=" (runner-up rate)")], ignore_index=True)
    acc = accuracy_column(results)
    variants = rows["dora"].fillna(False).astype(bool) | rows.get("nf4", pd.Series(False, rows.index)).fillna(False).astype(bool)
    n_full, n_lora = family_size(results, "vs_full"), family_size(results, "vs_lora")
    cells = {"method": [method_label(r, show_targets) + (r.get("label_suffix") if isinstance(r.get("label_suffix"), str) else "")
                        for _, r in rows.iterrows()],
             "trainable params": rows["trainable_params"].map("{:,}".format),
             "% of full's params": rows["pct_params_vs_full"].map(lambda v: f"{v:.1f}" if v >= 0.95 else f"{v:.2g}"),
             f"{accuracy} (mean ± std)": [f"{m:.4f} ± {s:.4f}" + diverged_note(r) for (_, r), m, s in
                                           zip(rows.iterrows(), rows[f"{acc}_mean"], rows[f"{acc}_std"])],
             f"difference to full finetuning, points (simultaneous 95% interval over {n_full})": [
                 interval(*v) for v in zip(rows.diff_vs_full, rows.diff_vs_full_low, rows.diff_vs_full_high)],
             "against full finetuning": [cell_word(v, s) for v, s in
                                         zip(rows["verdict_vs_full"], rows["rate_sensitive_vs_full"])]}
    if variants.any():
        cells[f"− LoRA at the same rank, points (simultaneous 95% interval over {n_lora})"] = [
            interval(*v) for v in zip(rows.diff_vs_lora, rows.diff_vs_lora_low, rows.diff_vs_lora_high)]
        cells["against LoRA"] = [cell_word(v, s) for v, s in zip(rows["verdict_vs_lora"], rows["rate_sensitive_vs_lora"])]
    for header, column in (extra or {}).items():
        cells[header] = rows[column].map("{:.3f}".format)
    cells["lr"] = rows["lr"].map("{:g}".format)
    return pd.DataFrame(cells)


def diverged_note(row) -> str:
    """", 3 of 5 seeds failed" where some diverged or never learned (a diverged_mean column), so that a mean
    pulled down by them is marked in the table itself."""
    share = row.get("diverged_mean", 0)
    return f", {round(share * row['seeds'])} of {int(row['seeds'])} seeds failed" if share and share > 0 else ""


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

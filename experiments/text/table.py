"""The text experiment's report across tasks: results/text.csv (one row per task and method), the README's table
laid out like the paper's Table 2 (one row per method, one column group per task), and its verdicts, every
sentence generated from the numbers."""

import json
from pathlib import Path

import pandas as pd

from .. import report
from ..protocol import stuck_at_grid_end
from ..storage import ROOT, Outputs, atomic_write
from .config import TASKS

TASK_LABELS = {"rotten_tomatoes": "Rotten Tomatoes", "imdb": "IMDB"}
COLUMNS = {"method": "method", "rank": "rank", "targets": "targets", "trainable_params": "trainable_params",
           "test_acc_mean": "acc_mean", "test_acc_std": "acc_std", "seeds": "seeds", "diff_vs_full": "diff_vs_full",
           "diff_vs_full_low": "diff_vs_full_low", "diff_vs_full_high": "diff_vs_full_high",
           "verdict_vs_full": "verdict_vs_full", "rate_sensitive_vs_full": "rate_sensitive_vs_full",
           "diverged_mean": "diverged_mean", "lr": "lr",
           "epochs": "epochs", "max_len": "max_len"}


def tasks_done(root: Path = ROOT) -> list[str]:
    return [t for t in TASKS if Outputs(f"text_{t}", root).summary.is_file()]


def combine(root: Path = ROOT) -> pd.DataFrame:
    """results/text.csv from every task's summary: one row per task and method, accuracy as acc_mean, acc_std."""
    frames = [pd.read_csv(Outputs(f"text_{t}", root).summary).rename(columns=COLUMNS)[list(COLUMNS.values())]
              .assign(task=t) for t in tasks_done(root)]
    table = pd.concat(frames)[["task", *COLUMNS.values()]].astype({"rank": "Int64"})
    atomic_write(Path(root) / "results" / "text.csv", table.to_csv(index=False, float_format="%.6g").encode())
    return table


def load(root: Path = ROOT) -> pd.DataFrame:
    """results/text.csv as combine() wrote it (ranks as ints, a missing verdict as "")."""
    table = pd.read_csv(Path(root) / "results" / "text.csv", dtype={"rank": "Int64"})
    return table.assign(verdict_vs_full=table["verdict_vs_full"].astype(object).fillna(""))


def training_time(root: Path = ROOT) -> str:
    """"123 s on NVIDIA H200 (Rotten Tomatoes 45 s, IMDB 78 s)": search and sweep, from the config files."""
    parts = {}
    for t in tasks_done(root):
        c = json.loads(Outputs(f"text_{t}", root).config.read_text())
        parts[t] = (c["tune_seconds"] + c["sweep_seconds"], c["environment"]["device_name"])
    if not parts:
        return ""
    each = ", ".join(f"{TASK_LABELS[t]} {s:.0f} s" for t, (s, _) in parts.items())
    return f"{sum(s for s, _ in parts.values()):.0f} s on {next(iter(parts.values()))[1]} ({each})"


def table2(combined: pd.DataFrame) -> pd.DataFrame:
    """One row per method, per task its accuracy (mean ± std) and its paired difference to full finetuning."""
    cells = {}
    for task, rows in combined.groupby("task", sort=False):
        rows = rows.set_index("method")
        cells.setdefault("method", [report.method_label(r | {"method": m}) for m, r in
                                    rows.to_dict("index").items()])
        cells.setdefault("trainable params", rows["trainable_params"].map("{:,}".format).tolist())
        label = TASK_LABELS[task]
        cells[f"{label}: accuracy"] = [f"{100 * m:.2f} ± {100 * s:.2f}" + report.diverged_note(r)
                                        for (_, r), m, s in zip(rows.iterrows(), rows.acc_mean, rows.acc_std)]
        cells[f"{label}: − full, points (simultaneous 95% interval)"] = [
            report.interval(*v) or "—" for v in zip(rows.diff_vs_full, rows.diff_vs_full_low, rows.diff_vs_full_high)]
        cells[f"{label}: verdict"] = [report.cell_word(v, s) for v, s in
                                      zip(rows.verdict_vs_full, rows.get("rate_sensitive_vs_full", [False] * len(rows)))]
    return pd.DataFrame(cells)


def verdicts(combined: pd.DataFrame) -> str:
    """Per task, each method's verdict against full finetuning (simultaneous intervals over the task's
    comparisons), and what that says of the paper's claim, no more than the intervals say."""
    lines = []
    for task, rows in combined.groupby("task", sort=False):
        judged = rows[rows.verdict_vs_full.map(report.cell_word) != ""]
        groups = {}
        for _, r in judged.iterrows():
            groups.setdefault(report.cell_word(r.verdict_vs_full, r.get("rate_sensitive_vs_full", False)),
                              []).append(report.method_label(r))
        said = "; ".join(f"{v}: {', '.join(ms)}" for v, ms in groups.items())
        qv = judged[judged.targets == "qv"]
        word = lambda r: r.verdict_vs_full.removesuffix(" (borderline)")
        close = [f"r={r['rank']}" for _, r in qv.iterrows() if word(r).startswith(("within", "above"))]
        unclear = [f"r={r['rank']}" for _, r in qv.iterrows() if word(r) == "not distinguishable"]
        if close:
            claim = (f"LoRA on Wq, Wv is within the margin of full finetuning, or above it, at {', '.join(close)}: "
                     "the paper's claim holds there")
        elif unclear:
            claim = (f"LoRA on Wq, Wv is neither shown within the margin of full finetuning nor below it at "
                     f"{', '.join(unclear)}: the data cannot settle the paper's claim there")
        else:
            claim = ("LoRA on Wq, Wv is below full finetuning at every rank: the paper's claim is not observed in this "
                     "smaller setting (another model, data, budget and precision than the paper's)")
        lines.append(f"- **{TASK_LABELS[task]}** ({len(judged)} comparisons with full finetuning over "
                     f"{int(rows.seeds.min())} paired seeds, simultaneous intervals): {said}. Here {claim}, at this "
                     "budget.")
    return "\n".join(lines)


def grid_edges(combined: pd.DataFrame, root: Path = ROOT) -> str:
    """Which methods' best rate stayed at an end of their grid after it grew as far as the protocol allows."""
    parts = [f"{TASK_LABELS[task]}: {method}" for task in combined.task.unique()
             for method in stuck_at_grid_end(pd.read_csv(Outputs(f"text_{task}", root).lr_search))]
    if not parts:
        return "Every method's best learning rate lies inside its grid (grown where it needed to)."
    return "Best at an end of the grid even after growing it: " + "; ".join(parts) + "."


def readme_block(root: Path = ROOT) -> str:
    """The README's text results: the Table-2 layout, what produced it, and the verdicts."""
    combined = load(root)
    notes = []
    for t in tasks_done(root):
        c = json.loads(Outputs(f"text_{t}", root).config.read_text())
        d, cfg = c["data"], c["config"]
        notes.append(f"{TASK_LABELS[t]}: {d['train']['reviews']:,} training, {d['val']['reviews']:,} validation and "
                     f"{d['test']['reviews']:,} test reviews, {cfg['max_len']} tokens, {cfg['epochs']} epoch{'s' * (cfg['epochs'] > 1)} at "
                     f"batch size {cfg['batch_size']}")
    return (report.markdown(table2(combined)) + "\n\nAccuracy in percent, mean ± std over seeds; the difference "
            "to full finetuning is paired by seed. " + "; ".join(notes) + ". Training (search and sweep): "
            f"{training_time(root)}. {weights_and_environment(root)} {grid_edges(combined, root)}\n\n" + verdicts(combined))


def weights_and_environment(root: Path = ROOT) -> str:
    """Which MiniLM weights and which library versions made the committed numbers (the GPU run's own)."""
    parts = []
    for t in tasks_done(root):
        c = json.loads(Outputs(f"text_{t}", root).config.read_text())
        env = c["environment"]
        copy = "float16" in c.get("weights", {}).get("weights", "")
        weights = ("MiniLM's weights rounded to float16 for the transfer to the GPU machine (upcast to float32 "
                   "there; bf16 autocast in the matrix products)" if copy else "MiniLM's float32 weights")
        parts.append(f"{weights}, Python {env['python']}, torch {env['torch']}")
    return ("Made with " + " and ".join(sorted(set(parts))) + " (the GPU machine's own environment, not "
            "requirements.txt's pins).")

"""The text experiment's report across tasks and budgets: results/text.csv (equal budget) and results/text_own.csv
(each method's own budget), one row per task and method; the README's tables laid out like the paper's Table 2
(one row per method, one column group per task); the verdicts, QLoRA's comparison and the savings, every sentence
generated from the numbers."""

import json
import math
from pathlib import Path

import pandas as pd

from .. import report, sentences
from ..protocol import stuck_at_grid_end
from ..storage import ROOT, Outputs, atomic_write
from . import records
from .config import TASKS

TASK_LABELS = {"rotten_tomatoes": "Rotten Tomatoes", "imdb": "IMDB"}
COLUMNS = {"method": "method", "rank": "rank", "targets": "targets", "trainable_params": "trainable_params",
           "test_acc_mean": "acc_mean", "test_acc_std": "acc_std", "seeds": "seeds", "diff_vs_full": "diff_vs_full",
           "diff_vs_full_low": "diff_vs_full_low", "diff_vs_full_high": "diff_vs_full_high",
           "verdict_vs_full": "verdict_vs_full", "diverged_mean": "diverged_mean", "nf4": "nf4",
           "diff_vs_float": "diff_vs_float", "diff_vs_float_low": "diff_vs_float_low",
           "diff_vs_float_high": "diff_vs_float_high", "verdict_vs_float": "verdict_vs_float", "lr": "lr",
           "epoch": "epoch", "steps": "steps", "max_len": "max_len"}


def tasks_done(root: Path = ROOT) -> list[str]:
    """The tasks whose run finished: both budgets' summaries are there."""
    return [t for t in TASKS if all(records.summary_path(root, t, b).is_file() for b in records.BUDGETS)]


def combined_path(root: Path, budget: str) -> Path:
    return Path(root) / "results" / ("text.csv" if budget == "equal" else f"text_{budget}.csv")


def combine(root: Path = ROOT) -> pd.DataFrame:
    """results/text.csv and results/text_own.csv from every task's summaries: one row per task and method, accuracy
    as acc_mean, acc_std. Returns the equal budget's."""
    out = {}
    for budget in records.BUDGETS:
        frames = [pd.read_csv(records.summary_path(root, t, budget)).rename(columns=COLUMNS)[list(COLUMNS.values())]
                  .assign(task=t) for t in tasks_done(root)]
        out[budget] = pd.concat(frames)[["task", *COLUMNS.values()]].astype({"rank": "Int64"})
        atomic_write(combined_path(root, budget), out[budget].to_csv(index=False, float_format="%.6g").encode())
    return out["equal"]


def load(root: Path = ROOT, budget: str = "equal") -> pd.DataFrame:
    """results/text.csv (or text_own.csv) as combine() wrote it (ranks as ints)."""
    return pd.read_csv(combined_path(root, budget), dtype={"rank": "Int64"})


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


def table2(combined: pd.DataFrame, budget: str = "equal") -> pd.DataFrame:
    """One row per method (every method of any task, in the first task's order), per task its accuracy (mean ± std)
    and its paired difference to full finetuning, blank where that task did not run the method; on the own budget
    also the epoch each method chose and its optimizer steps."""
    first = combined.drop_duplicates("method").set_index("method")
    cells = {"method": [records.label(r | {"method": m}) for m, r in first.to_dict("index").items()],
             "trainable params": first["trainable_params"].map("{:,}".format).tolist()}
    for task, rows in combined.groupby("task", sort=False):
        rows = rows.set_index("method").reindex(first.index)
        ran = rows["acc_mean"].notna()
        label = TASK_LABELS[task]
        cells[f"{label}: accuracy"] = [f"{100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f}" + report.diverged_note(r)
                                        if ok else "" for (_, r), ok in zip(rows.iterrows(), ran)]
        cells[f"{label}: − full, points (simultaneous 95% interval)"] = [
            (report.interval(r.diff_vs_full, r.diff_vs_full_low, r.diff_vs_full_high) or "—") if ok else ""
            for (_, r), ok in zip(rows.iterrows(), ran)]
        cells[f"{label}: verdict"] = [report.cell_word(v) if ok else "" for v, ok in zip(rows.verdict_vs_full, ran)]
        if budget == "own":
            cells[f"{label}: epoch (steps)"] = [f"{int(e)} ({int(s):,})" if ok else ""
                                                for e, s, ok in zip(rows.epoch, rows.steps, ran)]
    return pd.DataFrame(cells)


def verdicts(combined: pd.DataFrame, budget: str = "equal") -> str:
    """Per task, each method's verdict against full finetuning (simultaneous intervals over the task's
    comparisons), and what that says of the paper's claim at this budget, no more than the intervals say."""
    lines = []
    for task, rows in combined.groupby("task", sort=False):
        judged = rows[rows.verdict_vs_full.map(report.cell_word) != ""]
        groups = {}
        for _, r in judged.iterrows():
            groups.setdefault(r.verdict_vs_full, []).append(records.label(r))
        said = "; ".join(f"{report.cell_word(v)}: {', '.join(ms)}" for v, ms in groups.items())
        qv = judged[(judged.targets == "qv") & ~judged.nf4.astype(bool)]
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
            claim = ("LoRA on Wq, Wv is below full finetuning at every rank with a verdict: the paper's claim is not "
                     "observed in this smaller setting")
        what = ("every method read at the last epoch" if budget == "equal"
                else "each method at the rate and epoch chosen on validation")
        lines.append(f"- **{TASK_LABELS[task]}**, {what} ({len(judged)} comparisons with full finetuning over "
                     f"{int(rows.seeds.min())} paired seeds, simultaneous intervals): {said or 'no verdict'}. Here "
                     f"{claim}." + (" " + steps_sentence(rows) if budget == "own" else ""))
    return "\n".join(lines)


def steps_sentence(rows: pd.DataFrame) -> str:
    """"The chosen epochs used 400 optimizer steps (full finetuning) to 1,000 (LoRA on Wq, Wv, r=1)." """
    parts = [f"{records.label(r)} {int(r.steps):,}" for _, r in rows.iterrows()]
    return "Optimizer steps at the chosen epoch: " + "; ".join(parts) + "."


def qlora_lines(combined: pd.DataFrame, budget: str) -> str:
    """Per task that ran QLoRA: each QLoRA method against the same adapters over the float32 base (what the 4-bit
    base costs) and against full finetuning, with the verdicts."""
    lines = []
    for task, rows in combined.groupby("task", sort=False):
        q = rows[rows.nf4.astype(bool)]
        if q.empty:
            continue
        by = rows.set_index("method")
        parts = []
        for _, r in q.iterrows():
            float_twin = by.loc[records.twin(r.method)]
            against_float = (sentences.verdict_phrase(r.verdict_vs_float, "LoRA over the float32 base")
                             or "has no verdict against LoRA over the float32 base (a seed diverged)")
            against_full = (sentences.verdict_phrase(r.verdict_vs_full, "full finetuning")
                            or "has no verdict against full finetuning (a seed diverged)")
            parts.append(f"{records.label(r)} {100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f} against "
                         f"{100 * float_twin.acc_mean:.2f} ± {100 * float_twin.acc_std:.2f} over the float32 base: "
                         f"{report.interval(r.diff_vs_float, r.diff_vs_float_low, r.diff_vs_float_high) or '—'} "
                         f"points, it {against_float} (simultaneous over the {len(q)} QLoRA comparisons), and it "
                         f"{against_full}")
        lines.append(f"- **{TASK_LABELS[task]}**, {'equal' if budget == 'equal' else 'own'} budget: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def savings_block(root: Path = ROOT) -> str:
    """results/text_savings.csv as a table, and one generated sentence."""
    p = records.savings_path(root)  # not savings.py's: that imports the experiment, which imports this file
    if not p.is_file():
        return ""
    df = pd.read_csv(p)
    mib = lambda b: f"{b / 2**20:,.2f}"
    labels = {"full": "full finetuning"}
    cells = pd.DataFrame({
        "method": [labels.get(m) or records.label({"method": m, "rank": int(m.rsplit("_r", 1)[1]),
                                                   "targets": m.split("_")[1], "nf4": m.startswith("qlora")})
                   for m in df.method],
        "trainable params": df.trainable_params.map("{:,}".format),
        "Adam state, MiB": df.optimizer_state_bytes.map(mib), "checkpoint, MiB": df.checkpoint_bytes.map(mib),
        "frozen base in memory, MiB": df.base_bytes.map(mib),
        "peak GPU memory of a step, MiB": df.peak_gpu_mib.map(lambda v: "" if math.isnan(v) else f"{v:,.0f}")})
    full = df.set_index("method").loc["full"]
    q = df[df.method.str.startswith("qlora")].iloc[0]
    f = df.set_index("method").loc[records.twin(q.method)]
    sentence = (f"{cells.method[q.name]} trains {int(q.trainable_params):,} parameters against full finetuning's "
                f"{int(full.trainable_params):,} ({100 * q.trainable_params / full.trainable_params:.2f}%), keeps a "
                f"{q.checkpoint_bytes / 2**20:.2f} MiB checkpoint against {full.checkpoint_bytes / 2**20:.1f} MiB, and "
                f"holds its frozen base in {q.base_bytes / 2**20:.1f} MiB against {f.base_bytes / 2**20:.1f} MiB in "
                "float32 (the embeddings stay in float32: quantize_model takes nn.Linear layers only)")
    if not math.isnan(q.peak_gpu_mib):
        sentence += (f"; one training step peaks at {q.peak_gpu_mib:,.0f} MiB of GPU memory against "
                     f"{f.peak_gpu_mib:,.0f} MiB over the float32 base and {full.peak_gpu_mib:,.0f} MiB for full "
                     "finetuning (MiniLM is small: activations, not weights, dominate)")
    return report.markdown(cells) + "\n\n" + sentence + "."


def grid_edges(combined: pd.DataFrame, root: Path = ROOT) -> str:
    """Which methods' best rate stayed at an end of their grid after it grew as far as the protocol allows."""
    parts = [f"{TASK_LABELS[task]}: {method}" for task in combined.task.unique()
             for method in stuck_at_grid_end(pd.read_csv(Outputs(f"text_{task}", root).lr_search))]
    if not parts:
        return "Every method's best learning rate lies inside its grid (grown where it needed to)."
    return "Best at an end of the grid even after growing it: " + "; ".join(parts) + "."


def notes(root: Path = ROOT) -> str:
    """What each task trained on: reviews, tokens (and the share cut), epochs, batch size, steps an epoch."""
    parts = []
    for t in tasks_done(root):
        c = json.loads(Outputs(f"text_{t}", root).config.read_text())
        d, cfg = c["data"], c["config"]
        parts.append(f"{TASK_LABELS[t]}: {d['train']['reviews']:,} training, {d['val']['reviews']:,} validation and "
                     f"{d['test']['reviews']:,} test reviews at {cfg['max_len']} tokens ({100 * c['tokens_cut']:.0f}% of "
                     f"the training reviews' tokens cut), up to {cfg['epochs']} "
                     f"epoch{'s' * (cfg['epochs'] > 1)} of {c['steps_per_epoch']:,} steps at batch size "
                     f"{cfg['batch_size']}")
    return "; ".join(parts)


def readme_block(root: Path = ROOT) -> str:
    """The README's text results: both budgets' tables in the Table-2 layout with their verdicts, QLoRA's
    comparison, the savings, what produced them."""
    equal, own = load(root, "equal"), load(root, "own")
    block = ["**Every method at the same budget** (the last epoch):", "", report.markdown(table2(equal, "equal")), "",
             verdicts(equal, "equal"), "",
             "**Each method at its own budget** (rate and epoch chosen together on validation by `protocol.choose`; "
             "the test reviews read only at the chosen epoch):", "", report.markdown(table2(own, "own")), "",
             verdicts(own, "own")]
    q = [x for x in (qlora_lines(equal, "equal"), qlora_lines(own, "own")) if x]
    if q:
        block += ["", "**QLoRA** (LoRA over the encoder quantized to NF4 by `nf4.quantize_model`, the head in "
                      "float32) against the same adapters over the float32 base:", "", *q]
    if saved := savings_block(root):
        block += ["", "**What LoRA and QLoRA save** (Rotten Tomatoes' model, one model training alone):", "", saved]
    block += ["", "Accuracy in percent, mean ± std over seeds; the differences are paired by seed, and their "
              "intervals hold the test set's sampling noise too. " + notes(root) + ". Training (search and "
              f"sweeps): {training_time(root)}. {weights_and_environment(root)} "
              f"{grid_edges(equal, root)}"]
    return "\n".join(block)


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

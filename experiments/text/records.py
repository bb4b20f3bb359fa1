"""Records that outlive the selection rule: every epoch of every text run, committed as two compact CSVs per task,
and everything the tables say recomputed from them alone, without a GPU.

    results/text_<task>_search.csv   the search: method, lr, seed (100, 101, ...), epoch, val_correct, loss
    results/text_<task>_runs.csv     the reported runs: method, lr, seed (0, 1, ...), epoch, loss, val_correct,
                                     val_bits, test_bits (storage.pack_bits: which reviews it got right)

Every run trains to the task's maximum epoch under one schedule, so one family of runs serves both budgets:
- the equal budget: each method's rate chosen by `protocol.choose` on the last epoch's validation counts (as
  protocol.tune chose it), its test read at the last epoch;
- each method's own budget: rate and epoch chosen together, by `protocol.choose` on (rate, epoch) candidates
  ordered by rate, then epoch, so that a tie goes to the smaller rate and the earlier epoch; its test read at the
  chosen epoch only.
Choosing reads the search file alone (tuning seeds, validation): no choice can see a test review.
"""

import json
import math
from pathlib import Path

import pandas as pd

from .. import protocol, report, stats
from ..methods import Method
from ..protocol import TUNING_SEED
from ..storage import ROOT, Outputs, atomic_write, unpack_bits, with_int_columns

SEARCH_COLUMNS = ["method", "lr", "seed", "epoch", "val_correct", "loss"]
RUN_COLUMNS = ["method", "lr", "seed", "epoch", "loss", "val_correct", "val_bits", "test_bits"]
BUDGETS = ("equal", "own")  # every method at the maximum epoch; each at the (rate, epoch) it chose
MARGIN = 0.01  # "within ±M" on the text tasks, where a config saved before the margin field has none


def search_path(root: Path, task: str) -> Path:
    return Path(root) / "results" / f"text_{task}_search.csv"


def runs_path(root: Path, task: str) -> Path:
    return Path(root) / "results" / f"text_{task}_runs.csv"


def savings_path(root: Path) -> Path:
    """results/text_savings.csv: what each method keeps in memory and on disk (savings.py measures it)."""
    return Path(root) / "results" / "text_savings.csv"


def summary_path(root: Path, task: str, budget: str) -> Path:
    """results/text_<task>.csv (equal budget, as before) and results/text_<task>_own.csv."""
    return Outputs(f"text_{task}", root).summary if budget == "equal" else Path(root) / "results" / f"text_{task}_own.csv"


# ─── from the run cache's records to the long files ───────────────────────────────────────────────────────────

def search_frame(records: list[dict]) -> pd.DataFrame:
    """One row per tuning run and epoch: its validation count and mean training loss."""
    rows = [{"method": r["method"], "lr": r["lr"], "seed": r["seed"], "epoch": e + 1, "val_correct": c, "loss": loss}
            for r in records for e, (c, loss) in enumerate(zip(r["val_correct_epochs"], r["epoch_losses"]))]
    return pd.DataFrame(rows, columns=SEARCH_COLUMNS).sort_values(["method", "lr", "seed", "epoch"], kind="stable")


def runs_frame(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per reported run and epoch (from protocol.sweep's rows, which carry the per-epoch lists)."""
    rows = [{"method": r.method, "lr": r.lr, "seed": r.seed, "epoch": e + 1, "loss": r.epoch_losses[e],
             "val_correct": r.val_correct_epochs[e], "val_bits": r.val_bits_epochs[e], "test_bits": r.test_bits_epochs[e]}
            for r in per_seed.itertuples() for e in range(len(r.epoch_losses))]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def write(root: Path, task: str, search: pd.DataFrame, runs: pd.DataFrame) -> None:
    """Both files, merged with what is already there (a sweep at a second rate adds rows), sorted, no duplicates."""
    for path, new, key in ((search_path(root, task), search, ["method", "lr", "seed", "epoch"]),
                           (runs_path(root, task), runs, ["method", "lr", "seed", "epoch"])):
        atomic_write(path, new.drop_duplicates(key).sort_values(key, kind="stable").to_csv(index=False).encode())


def read(root: Path, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(search_path(root, task)), pd.read_csv(runs_path(root, task))


# ─── choosing, from the search alone ──────────────────────────────────────────────────────────────────────────

def with_first_losses(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (search or runs rows) with a column "first": each run's first epoch's mean training loss."""
    first = frame[frame["epoch"] == 1].set_index(["method", "lr", "seed"])["loss"]
    return frame.assign(first=[first[k] for k in zip(frame["method"], frame["lr"], frame["seed"])])


def _by_candidate(search: pd.DataFrame, classes: int, keys: list[str], n_val: int):
    """(candidates ascending by `keys`, counts per candidate and tuning seed, each candidate's protocol.flag from
    its seeds' validation accuracy there and their training loss, first epoch's and this one's)."""
    cands, correct, flags = [], [], []
    for key, g in search.sort_values([*keys, "seed"]).groupby(keys, sort=True):
        cands.append(key[0] if len(keys) == 1 else key)
        correct.append([int(c) for c in g["val_correct"]])
        flags.append(protocol.flag([c / n_val for c in g["val_correct"]], list(g["first"]), list(g["loss"]), classes))
    return cands, correct, flags


def choose_equal(search: pd.DataFrame, classes: int, epochs: int, n_val: int) -> dict[str, tuple[float, int]]:
    """{method: (lr, epochs)}: `protocol.choose` on the last epoch's counts, as protocol.tune chose (its grid grown
    the same way); every rate out: the smallest."""
    chosen = {}
    search = with_first_losses(search)
    for method, g in search[search["epoch"] == epochs].groupby("method", sort=False):
        lrs, correct, out = _by_candidate(g, classes, ["lr"], n_val)
        c = protocol.choose([float(x) for x in lrs], correct, out)
        chosen[method] = (c.lr if c.lr is not None else float(lrs[0]), epochs)
    return chosen


def choose_own(search: pd.DataFrame, classes: int, n_val: int) -> dict[str, tuple[float, int]]:
    """{method: (lr, epoch)}: `protocol.choose` on every (rate, epoch) of the search at once. The candidates go in
    as positions 1, 2, ... in (rate, epoch) order: where the rule prefers the smaller of two near-equal "rates",
    it prefers the smaller rate and then the earlier epoch. A candidate flagged diverged or too slow (protocol.flag,
    read at that epoch) is out; every candidate out: the smallest rate at the last epoch. (A runner-up is not swept
    on the text tasks: it would cost a GPU sweep of its own.)"""
    chosen = {}
    search = with_first_losses(search)
    for method, g in search.groupby("method", sort=False):
        cands, correct, out = _by_candidate(g, classes, ["lr", "epoch"], n_val)
        c = protocol.choose([float(i + 1) for i in range(len(cands))], correct, out)
        if c.lr is None:
            lr0 = min(lr for lr, _ in cands)
            chosen[method] = (float(lr0), int(max(e for lr, e in cands if lr == lr0)))
        else:
            lr, epoch = cands[int(c.lr) - 1]
            chosen[method] = (float(lr), int(epoch))
    return chosen


def choices(search: pd.DataFrame, classes: int, epochs: int, n_val: int) -> dict[str, dict[str, tuple[float, int]]]:
    """Both budgets' {method: (lr, epoch)}, from the tuning seeds' validation counts only (n_val reviews)."""
    if (search["seed"] < TUNING_SEED).any():
        raise ValueError("the search file holds reported seeds: choices are made on the tuning seeds only")
    return {"equal": choose_equal(search, classes, epochs, n_val), "own": choose_own(search, classes, n_val)}


# ─── the tables ───────────────────────────────────────────────────────────────────────────────────────────────

def label(row) -> str:
    """report.method_label, with QLoRA named: "QLoRA on Wq, Wv, r=8"."""
    text = report.method_label(row)
    return text.replace("LoRA", "QLoRA", 1) if bool(row.get("nf4", False)) else text


def per_seed_at(runs: pd.DataFrame, methods: pd.DataFrame, chosen: dict[str, tuple[float, int]],
                classes: int, n_val: int) -> pd.DataFrame:
    """Each method's reported runs at its chosen (lr, epoch): one row per method and seed, test read there only;
    "diverged" where the run failed there (protocol.failed: its loss rose, or its validation stayed near chance)."""
    rows = []
    runs = with_first_losses(runs)
    for m in methods.itertuples():
        lr, epoch = chosen[m.method]
        at = runs[(runs["method"] == m.method) & (runs["epoch"] == epoch) & np_isclose(runs["lr"], lr)]
        if at.empty:
            raise ValueError(f"no reported run of {m.method} at lr {lr:g}, epoch {epoch}: sweep it first")
        for r in at.sort_values("seed").itertuples():
            right = unpack_bits(r.test_bits)
            rows.append({"method": m.method, "kind": m.kind, "rank": m.rank, "targets": m.targets, "nf4": m.nf4,
                         "alpha": m.alpha, "trainable_params": m.trainable_params, "lr": lr, "epoch": epoch,
                         "seed": r.seed, "test_acc": right.mean(), "test_correct": r.test_bits,
                         "loss_last_epoch": r.loss,
                         "diverged": bool(protocol.failed(r.first, r.loss, r.val_correct / n_val, classes))})
    return with_int_columns(pd.DataFrame(rows))


def np_isclose(a: pd.Series, b: float) -> pd.Series:
    return (a - b).abs() <= 1e-12 * max(abs(b), 1e-300)


def summarize(per_seed: pd.DataFrame, methods: list[Method], cfg: dict, steps_per_epoch: int) -> pd.DataFrame:
    """report.summarize (every method against full finetuning, simultaneous intervals over the task's
    comparisons), each method's epoch and optimizer steps, and QLoRA against LoRA at the same rank and targets over
    the float32 base (diff_vs_float, its simultaneous interval and verdict over the QLoRA comparisons)."""
    margin = cfg.get("margin", MARGIN)
    out = report.summarize(per_seed, methods, "test_acc", margin, ("diverged",),
                           budget={"batch_size": cfg["batch_size"], "max_len": cfg["max_len"]})
    epochs = per_seed.groupby("method", sort=False)["epoch"].first()
    out["nf4"] = out["nf4"].astype(bool)  # report.summarize's column, from the per-seed rows
    out.insert(len(out.columns) - 1, "epoch", out["method"].map(epochs).astype(int))
    out.insert(len(out.columns) - 1, "steps", out["epoch"] * steps_per_epoch)
    versus = versus_float_base(per_seed, margin)
    for c in ("diff_vs_float", "diff_vs_float_low", "diff_vs_float_high", "verdict_vs_float"):
        out[c] = out["method"].map(versus[c]) if len(versus) else math.nan
    out["verdict_vs_float"] = out["verdict_vs_float"].astype(object).fillna("")
    return out


def twin(method: str) -> str:
    """The same adapters over the float32 base: "qlora_qv_r8" -> "lora_qv_r8"."""
    return "lora_" + method.removeprefix("qlora_")


def versus_float_base(per_seed: pd.DataFrame, margin: float) -> pd.DataFrame:
    """Per QLoRA method: the paired difference to its float32 twin (stats.paired_differences, the test set's
    noise included), its simultaneous interval and verdict over the QLoRA comparisons (stats.family); a pair with a
    failed seed keeps its difference but gets no interval or verdict."""
    rows = []
    for q in per_seed.loc[per_seed["nf4"].astype(bool), "method"].unique():
        pair = per_seed[per_seed["method"].isin([q, twin(q)])]
        d = stats.paired_differences(pair, "test_acc", twin(q)).set_index("method").loc[[q]]
        rows.append(d.assign(bad=bool(pair["diverged"].any())))
    if not rows:
        return pd.DataFrame()
    df = pd.concat(rows)
    fam = stats.family(df[~df["bad"]], margin) if (~df["bad"]).any() else pd.DataFrame()
    return pd.DataFrame({"diff_vs_float": df["diff_mean"],
                         "diff_vs_float_low": fam.get("diff_low", pd.Series(dtype=float)).reindex(df.index),
                         "diff_vs_float_high": fam.get("diff_high", pd.Series(dtype=float)).reindex(df.index),
                         "verdict_vs_float": fam.get("verdict", pd.Series(dtype=object)).reindex(df.index).fillna("")})


def methods_frame(config: dict) -> pd.DataFrame:
    """The config file's "methods" list (name, kind, rank, targets, nf4, alpha, trainable_params) as a frame."""
    return pd.DataFrame(config["methods"]).rename(columns={"name": "method"})


def method_objects(config: dict) -> list[Method]:
    return [Method(m["kind"], m["rank"], m["targets"] or "all", nf4=m["nf4"]) for m in config["methods"]]


def tables(root: Path, task: str) -> dict[str, pd.DataFrame]:
    """Both budgets' summaries of one task, from its committed config and record files alone (no GPU)."""
    config = json.loads(Outputs(f"text_{task}", root).config.read_text())
    search, runs = read(root, task)
    cfg, classes = config["config"], 2
    chosen = choices(search, classes, cfg["epochs"], cfg["val_size"])
    methods, objects = methods_frame(config), method_objects(config)
    return {b: summarize(per_seed_at(runs, methods, chosen[b], classes, cfg["val_size"]), objects, cfg,
                         config["steps_per_epoch"]) for b in BUDGETS}


def to_csv(summary: pd.DataFrame) -> bytes:
    """How a summary is committed: 6 significant digits."""
    return summary.to_csv(index=False, float_format="%.6g").encode()


def recompute(root: Path = ROOT, tasks: list[str] | None = None) -> dict[tuple[str, str], bytes]:
    """{(task, budget): the summary CSV's bytes} recomputed from the committed records of every task that has them:
    a change of protocol.choose or of the verdict words is re-read with this, no GPU needed."""
    from .config import TASKS
    done = [t for t in (tasks or TASKS) if search_path(root, t).is_file() and runs_path(root, t).is_file()]
    return {(t, b): to_csv(s) for t in done for b, s in tables(root, t).items()}

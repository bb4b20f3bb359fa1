"""Two runs of one experiment side by side, so that a re-run reports itself: whether its tables are the committed
ones byte for byte, within the seed spread, or which learning rates and verdicts moved.

    python -m experiments compare --experiment mlp                  # the working tree's files against git HEAD's
    python -m experiments compare --experiment mlp --against DIR    # against the files under another root

Only results files are compared, never times: a re-run on the same machine should say "byte-identical".
"""

import io
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from .report import accuracy_column, cell_word, method_label
from .storage import ROOT, Outputs, with_int_columns

SAME = ("summary", "test_correct")  # the files whose bytes decide "byte-identical" (per_seed may hold times)


def files_at_revision(experiment: str, rev: str, folder: Path) -> Outputs:
    """The committed results files of `experiment` at git revision `rev`, written under `folder` (the summary
    must be there; an older revision may lack the rest)."""
    out = Outputs(experiment, folder)
    for name in SAME:
        path = getattr(Outputs(experiment), name)
        shown = subprocess.run(["git", "show", f"{rev}:{path.relative_to(ROOT).as_posix()}"], cwd=ROOT,
                               capture_output=True)
        if shown.returncode != 0 and name != "summary":
            continue
        if shown.returncode != 0:
            raise FileNotFoundError(f"{path.relative_to(ROOT)} is not in git revision {rev}: "
                                    f"{shown.stderr.decode().strip()}")
        target = getattr(out, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shown.stdout)
    return out


def verdict_cell(summary: pd.DataFrame, method: str, against: str) -> str:
    """A method's verdict in one column, "; rate-sensitive" added where marked; "" where the column is absent."""
    if f"verdict_{against}" not in summary:
        return ""
    sensitive = summary[f"rate_sensitive_{against}"].get(method) if f"rate_sensitive_{against}" in summary else False
    return cell_word(summary[f"verdict_{against}"].get(method), bool(sensitive) if sensitive == sensitive else False)


def agree(before: str, now: str) -> bool:
    """Two runs agree on a verdict where its words are the same (a "(borderline)" or "rate-sensitive" mark
    aside), or where both runs mark it borderline or rate-sensitive: a verdict at the margin is allowed to move."""
    word = lambda v: v.split(";")[0].removesuffix(" (borderline)")
    marked = lambda v: "borderline" in v or "rate-sensitive" in v
    return word(before) == word(now) or (marked(before) and marked(now))


def side_by_side(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """One row per method of both summaries: the two means and rates, the difference in units of the seed spread
    (the two runs' standard deviations pooled), and the two runs' verdicts in both columns (against full
    finetuning, and against LoRA at the same rank)."""
    acc = accuracy_column(new)
    several = new["targets"].dropna().nunique() > 1  # name target sets only where there are several
    old, new = old.set_index("method"), new.set_index("method")
    rows = []
    for m in new.index.intersection(old.index, sort=False):
        spread = ((old.at[m, f"{acc}_std"] ** 2 + new.at[m, f"{acc}_std"] ** 2) / 2) ** 0.5
        rows.append({"method": method_label(new.loc[m].to_dict() | {"method": m}, several),
                     "mean before": old.at[m, f"{acc}_mean"], "mean now": new.at[m, f"{acc}_mean"],
                     "difference / seed std": (new.at[m, f"{acc}_mean"] - old.at[m, f"{acc}_mean"]) / spread,
                     "lr before": old.at[m, "lr"], "lr now": new.at[m, "lr"],
                     **{f"{label} {when}": verdict_cell(table, m, against)
                        for against, label in (("vs_full", "verdict"), ("vs_lora", "vs LoRA"))
                        for when, table in (("before", old), ("now", new))}})
    return pd.DataFrame(rows)


def compare(old: Outputs, new: Outputs) -> tuple[str, pd.DataFrame]:
    """(one paragraph saying how the runs differ, the side-by-side table)."""
    if all(getattr(old, f).is_file() and getattr(old, f).read_bytes() == getattr(new, f).read_bytes() for f in SAME):
        return f"{new.experiment}: byte-identical to the other run (the table and every test prediction).", pd.DataFrame()
    table = side_by_side(with_int_columns(pd.read_csv(old.summary)), with_int_columns(pd.read_csv(new.summary)))
    rates = table[table["lr before"] != table["lr now"]]
    far = table[table["difference / seed std"].abs() > 2]
    parts = [f"{new.experiment}: not byte-identical; {len(table) - len(rates)} of {len(table)} learning rates the "
             f"same, {int((table['difference / seed std'].abs() <= 1).sum())} of {len(table)} means within one "
             f"seed standard deviation of the other run's (largest move {table['difference / seed std'].abs().max():.1f})."]
    moved = []
    for label, name in (("verdict", "against full finetuning"), ("vs LoRA", "against LoRA")):
        pairs = table[(table[f"{label} before"] != "") | (table[f"{label} now"] != "")]
        if not len(pairs):
            continue
        ok = [agree(b, n) for b, n in zip(pairs[f"{label} before"], pairs[f"{label} now"])]
        parts.append(f"Verdicts {name}: {sum(ok)} of {len(ok)} agree (the same words, or marked borderline or "
                     f"rate-sensitive in both runs).")
        moved += [f"{r.method} {name}: {r[f'{label} before'] or '(none)'} → {r[f'{label} now'] or '(none)'}"
                  for (_, r), a in zip(pairs.iterrows(), ok) if not a]
    if len(rates):
        parts.append("Other rates: " + "; ".join(f"{r.method} {r['lr before']:g} → {r['lr now']:g}"
                                                 for _, r in rates.iterrows()) + ".")
    if moved:
        parts.append("Verdicts that moved: " + "; ".join(moved) + ".")
    if len(far):
        parts.append("More than two seed standard deviations apart: " + ", ".join(far.method) + ".")
    return " ".join(parts), table


def against(experiment: str, other: str = "HEAD", root: Path = ROOT) -> tuple[str, pd.DataFrame]:
    """compare() of the files under `root` against another run's: `other` is a folder holding its results, or a
    git revision whose committed files are read (FileNotFoundError where it has none)."""
    if Path(other).is_dir():
        return compare(Outputs(experiment, Path(other)), Outputs(experiment, root))
    with tempfile.TemporaryDirectory() as tmp:
        return compare(files_at_revision(experiment, other, Path(tmp)), Outputs(experiment, root))


def markdown(table: pd.DataFrame) -> str:
    """The side-by-side table as markdown, numbers rounded for reading."""
    if table.empty:
        return ""
    shown = table.assign(**{c: table[c].map("{:.4f}".format) for c in ("mean before", "mean now")},
                         **{"difference / seed std": table["difference / seed std"].map("{:+.2f}".format)},
                         **{c: table[c].map("{:g}".format) for c in ("lr before", "lr now")})
    buf = io.StringIO()
    buf.write("| " + " | ".join(shown.columns) + " |\n|---|" + "---:|" * (len(shown.columns) - 1) + "\n")
    for row in shown.itertuples(index=False):
        buf.write("| " + " | ".join(str(c) for c in row) + " |\n")
    return buf.getvalue().rstrip("\n")

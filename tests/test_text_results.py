"""The committed text results agree with each other: results/text.csv, the per-task files, the executed notebook,
the README's generated block and the bench table."""

import json

import pandas as pd

from experiments import report, storage
from experiments.protocol import REPORT_FIELDS
from experiments.text import table
from experiments.text.config import TASKS, TextConfig

ROOT = storage.ROOT


def notebook_text() -> str:
    nb = json.loads((ROOT / "lora_text.ipynb").read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])


def test_text_csv_has_one_row_per_task_and_method_with_the_issues_columns():
    combined = pd.read_csv(ROOT / "results" / "text.csv")
    methods = [m.name for m in TextConfig().methods]
    assert list(combined.task) == [t for t in TASKS for _ in methods] and list(combined.method) == methods * 2
    for column in ("trainable_params", "acc_mean", "acc_std", "seeds", "diff_vs_full", "diff_vs_full_low",
                   "diff_vs_full_high"):
        assert column in combined
    assert (combined.seeds >= 5).all()


def test_text_csv_is_the_per_task_summaries_combined():
    combined = pd.read_csv(ROOT / "results" / "text.csv")
    for task in TASKS:
        summary = pd.read_csv(storage.Outputs(f"text_{task}").summary)
        rows = combined[combined.task == task].reset_index(drop=True)
        pd.testing.assert_series_equal(rows.acc_mean, summary.test_acc_mean, check_names=False)
        config = json.loads(storage.Outputs(f"text_{task}").config.read_text())
        now = json.loads(json.dumps(TextConfig.default(task).__dict__))
        assert config["config"] == {k: v for k, v in now.items() if k in config["config"] or k not in REPORT_FIELDS}
        assert config["environment"]["device"].startswith("cuda")


def test_the_readme_block_is_generated_from_the_committed_files():
    start, end = report.readme_markers("text")
    assert f"{start}\n{table.readme_block(ROOT)}\n{end}" in (ROOT / "README.md").read_text()


def test_the_executed_notebook_shows_the_committed_table():
    shown = notebook_text()
    for line in report.markdown(table.table2(table.load(ROOT))).splitlines():
        assert line in shown


def test_the_bench_table_holds_plain_and_stacked_steps_side_by_side():
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    section = results[results.index("## Text experiment"):]
    for length in (64, 256):
        for method in ("lora_qv_r8", "full"):
            assert f"| {length} | {method} | plain | 1 |" in section and f"| {length} | {method} | stacked | 12 |" in section

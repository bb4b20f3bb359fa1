"""The notebook runs top to bottom, and the committed outputs agree with each other (issue 3)."""

import json

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

import experiment as ex

NOTEBOOK = ex.ROOT / "lora_from_scratch.ipynb"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebook_runs_top_to_bottom_in_quick_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_QUICK", "1")
    monkeypatch.setenv("LORA_OUT_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_DEVICE", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ex.ROOT)}}).execute()
    for name in ("results.csv", "results_per_seed.csv", "config.json", "parameters_vs_accuracy.png",
                 "lr_search.csv", "learning_rates.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "config.json").read_text())["config"]["seeds"] == ex.Config.quick().seeds
    assert [c.execution_count for c in code_cells(nb)] == list(range(1, len(code_cells(nb)) + 1))


def test_the_committed_notebook_was_run_from_a_fresh_kernel_in_order_without_errors():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert "LORA_QUICK" in cells[1].source  # and it ran the default config, not the quick one:
    assert "Config(seeds=5, ranks=(1, 2, 4, 8, 16, 32, 64)" in cells[1].outputs[0].data["text/plain"]


def committed_results():
    return pd.read_csv(ex.ROOT / "results.csv").astype({"rank": "Int64", "alpha": "Int64"})


def test_results_csv_is_the_summary_of_the_per_seed_rows():
    per_seed = pd.read_csv(ex.ROOT / "results_per_seed.csv").astype({"rank": "Int64", "alpha": "Int64"})
    config = json.loads((ex.ROOT / "config.json").read_text())["config"]
    cfg = ex.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    assert cfg == ex.Config()  # the committed results are the default config's
    pd.testing.assert_frame_equal(ex.summarize(per_seed, cfg), committed_results(), rtol=1e-5, check_dtype=False)
    assert ex.load_learning_rates(ex.ROOT, cfg) == dict(zip(per_seed.method, per_seed.lr))


def test_the_notebook_prints_the_numbers_of_results_csv():
    text = "".join(o.get("text", "") for c in code_cells(nbformat.read(NOTEBOOK, as_version=4)) for o in c.outputs)
    for _, r in committed_results().iterrows():
        assert f"{r['acc_B_mean']:.4f} ± {r['acc_B_std']:.4f}" in text, r["method"]


def test_the_readme_table_is_results_csv():
    config = json.loads((ex.ROOT / "config.json").read_text())
    readme = (ex.ROOT / "README.md").read_text()
    assert f"{ex.README_START}\n{ex.markdown_table(committed_results(), config)}\n{ex.README_END}" in readme


def test_the_readme_gives_the_two_commands():
    readme = (ex.ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme

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


NOTEBOOKS = {"mlp": NOTEBOOK, "transformer": ex.ROOT / "lora_transformer.ipynb"}
DEFAULTS = {"mlp": ex.Config(), "transformer": ex.Config.transformer()}


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_the_notebook_runs_top_to_bottom_in_quick_mode(model, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_QUICK", "1")
    monkeypatch.setenv("LORA_OUT_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_DEVICE", "cpu")
    nb = nbformat.read(NOTEBOOKS[model], as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ex.ROOT)}}).execute()
    cfg = ex.Config.quick(model)
    for name in (f"results{cfg.suffix}.csv", f"results{cfg.suffix}_per_seed.csv", f"config{cfg.suffix}.json",
                 cfg.figure, f"lr_search{cfg.suffix}.csv", f"learning_rates{cfg.suffix}.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / f"config{cfg.suffix}.json").read_text())["config"]["seeds"] == cfg.seeds
    assert [c.execution_count for c in code_cells(nb)] == list(range(1, len(code_cells(nb)) + 1))


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_the_committed_notebook_was_run_from_a_fresh_kernel_in_order_without_errors(model):
    cells = code_cells(nbformat.read(NOTEBOOKS[model], as_version=4))
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    config_cell = next(c for c in cells if "LORA_QUICK" in c.source)  # and it ran the default config:
    assert config_cell.outputs[0].data["text/plain"] == repr(DEFAULTS[model])


def committed_results(model="mlp"):
    return ex.load_results(ex.ROOT, DEFAULTS[model])


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_results_csv_is_the_summary_of_the_per_seed_rows(model):
    cfg = DEFAULTS[model]
    per_seed = pd.read_csv(ex.ROOT / f"results{cfg.suffix}_per_seed.csv").astype({"rank": "Int64", "alpha": "Int64"})
    config = json.loads((ex.ROOT / f"config{cfg.suffix}.json").read_text())["config"]
    assert ex.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}) == cfg
    pd.testing.assert_frame_equal(ex.summarize(per_seed, cfg), committed_results(model), rtol=1e-5,
                                  check_dtype=False)
    assert ex.load_learning_rates(ex.ROOT, cfg) == dict(zip(per_seed.method, per_seed.lr))


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_the_notebook_prints_the_numbers_of_its_results_csv(model):
    cells = code_cells(nbformat.read(NOTEBOOKS[model], as_version=4))
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/html", "") for c in cells for o in c.outputs)
    for _, r in committed_results(model).iterrows():
        assert f"{r['acc_B_mean']:.4f} ± {r['acc_B_std']:.4f}" in text, r["method"]


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_the_readme_tables_are_the_results_csvs(model):
    cfg = DEFAULTS[model]
    config = json.loads((ex.ROOT / f"config{cfg.suffix}.json").read_text())
    start, end = ex.readme_markers(model)
    readme = (ex.ROOT / "README.md").read_text()
    assert f"{start}\n{ex.markdown_table(committed_results(model), config)}\n{end}" in readme


def test_the_readme_gives_the_two_commands():
    readme = (ex.ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme

"""The notebooks run top to bottom, and the committed outputs, the notebooks and the README agree."""

import json
import re

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient

from experiments import protocol, report, sentences, storage
from experiments.__main__ import make_experiment
from experiments.mnist import tasks
from experiments.mnist.config import Config
from experiments.mnist.report import REFERENCE
from experiments.text import records, run, savings, table
from experiments.text.config import TASKS, TextConfig

ROOT = storage.ROOT
NOTEBOOKS = {"mlp": ROOT / "lora_from_scratch.ipynb", "transformer": ROOT / "lora_transformer.ipynb",
             "text": ROOT / "lora_text.ipynb"}
EXPERIMENTS = ["mlp", "transformer"]  # the text experiment's committed files: tests/test_text_results.py
DEFAULTS = {"mlp": Config(), "transformer": Config.transformer(),
            "text": [TextConfig.default(task) for task in TASKS]}
QUICK = {"mlp": Config.quick(), "transformer": Config.quick("transformer")}


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_notebook_runs_top_to_bottom_in_quick_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_QUICK", "1")
    monkeypatch.setenv("LORA_OUT_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_DEVICE", "cpu")
    nb = nbformat.read(NOTEBOOKS[name], as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    out = storage.Outputs(name, tmp_path)
    for path in out.all():
        assert path.is_file(), path
    assert json.loads(out.config.read_text())["config"]["seeds"] == QUICK[name].seeds
    assert [c.execution_count for c in code_cells(nb)] == list(range(1, len(code_cells(nb)) + 1))


def test_the_text_notebook_runs_top_to_bottom_in_quick_mode_through_both_budgets_and_qlora(tmp_path, monkeypatch):
    """The CPU dry run of the GPU job: lora_text.ipynb on the tiny config, both tasks, both budgets, QLoRA and the
    savings; every file appears, the tables are re-read from the records, and the notebook prints the README block
    that `python -m experiments readme --experiment text` would write from those files."""
    monkeypatch.setenv("LORA_QUICK", "1")
    monkeypatch.setenv("LORA_OUT_DIR", str(tmp_path))
    monkeypatch.setenv("LORA_DEVICE", "cpu")
    nb = nbformat.read(NOTEBOOKS["text"], as_version=4)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    assert [c.execution_count for c in code_cells(nb)] == list(range(1, len(code_cells(nb)) + 1))
    for task in TASKS:
        out = storage.Outputs(f"text_{task}", tmp_path)
        for path in (out.lr_search, out.learning_rates, out.config, records.search_path(tmp_path, task),
                     records.runs_path(tmp_path, task), *(records.summary_path(tmp_path, task, b) for b in records.BUDGETS),
                     *(run.figure_path(tmp_path, task, b) for b in records.BUDGETS),
                     tmp_path / "results" / f"text_{task}_curves.png"):
            assert path.is_file(), path
        assert json.loads(out.config.read_text())["config"] == json.loads(json.dumps(TextConfig.quick(task).__dict__))
    for budget in records.BUDGETS:
        assert table.combined_path(tmp_path, budget).is_file()
    assert savings.path(tmp_path).is_file()
    printed = "".join(o.get("text", "") for c in code_cells(nb) for o in c.outputs)
    block = table.readme_block(tmp_path)
    assert block in printed and "QLoRA on Wq, Wv, r=2" in block and "What LoRA and QLoRA save" in block
    shown = [o.get("data", {}) for c in code_cells(nb) for o in c.outputs]
    figures = sum("image/png" in d or "".join(d.get("text/plain", "")).startswith("<Figure") for d in shown)
    assert figures == 4  # two tasks' curves and own-budget figures (a PNG where the kernel renders them)


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_the_committed_notebook_was_run_from_a_fresh_kernel_in_order_without_errors(name):
    if name == "text" and not all(records.runs_path(ROOT, t).is_file() for t in TASKS):
        pytest.skip("lora_text.ipynb is committed unexecuted until the GPU run (bench/README.md, 'The text "
                    "experiment in pieces')")
    cells = code_cells(nbformat.read(NOTEBOOKS[name], as_version=4))
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    config_cell = next(c for c in cells if "notebook.settings" in c.source or "LORA_QUICK" in c.source)
    shown = next(o for o in config_cell.outputs if o.output_type == "execute_result")  # after the device line
    assert shown.data["text/plain"] == repr(DEFAULTS[name])  # it ran the default config


def test_the_mlp_notebook_builds_lora_and_trains_it_by_hand_before_the_learning_rate_search():
    """The layer is written in a cell, asserted against lora.LoRALinear and trained by a loop written in a cell,
    all before the search; no cell shows library code by inspect.getsource."""
    cells = nbformat.read(NOTEBOOKS["mlp"], as_version=4).cells
    first = lambda text: next(i for i, c in enumerate(cells) if text in c.source)
    built, checked = first("class LoRALinearByHand(nn.Module)"), first("assert torch.allclose(ours(x), theirs(x)")
    trained, search = first("lora_losses = fit(model"), first("## Learning rates, chosen on validation")
    assert built < checked < first("def fit(") < trained < search
    assert not any("inspect.getsource" in c.source for c in cells)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_results_csv_is_the_summary_of_the_per_seed_rows(name):
    cfg, out = DEFAULTS[name], storage.Outputs(name)
    per_seed = storage.load_per_seed(out)  # with which test images each run got right: the intervals use them
    config = json.loads(out.config.read_text())["config"]
    assert type(cfg)(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}) == cfg
    exp = make_experiment(name, torch.device("cpu"))
    pd.testing.assert_frame_equal(exp.summarize(per_seed), storage.load_results(out), rtol=1e-5, check_dtype=False)
    lrs = storage.load_learning_rates(out, protocol.tuning_fields(cfg), exp.tune_command())
    chosen = per_seed[~per_seed["runner_up"].astype(bool)] if "runner_up" in per_seed else per_seed
    assert lrs == dict(zip(chosen.method, chosen.lr))
    runner_up = report.runner_up_rows(per_seed, exp.summarize)
    if len(runner_up):
        pd.testing.assert_frame_equal(runner_up, storage.load_results(out, runner_up=True), rtol=1e-5,
                                      check_dtype=False)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_notebook_prints_the_numbers_of_its_results_csv(name):
    cells = code_cells(nbformat.read(NOTEBOOKS[name], as_version=4))
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/html", "") for c in cells for o in c.outputs)
    mean, std = ("test_acc_mean", "test_acc_std") if name == "text" else ("acc_B_mean", "acc_B_std")
    for _, r in storage.load_results(storage.Outputs(name)).iterrows():
        assert f"{r[mean]:.4f} ± {r[std]:.4f}" in text, r["method"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_readme_tables_are_the_results_csvs(name):
    out = storage.Outputs(name)
    results, config = storage.load_results(out), storage.load_config(out)
    table = make_experiment(name, torch.device("cpu")).readme_block(results, config,
                                                                   storage.load_results(out, runner_up=True))
    start, end = report.readme_markers(name)
    assert f"{start}\n{table}\n{end}" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_committed_search_gives_the_committed_learning_rates_under_the_rule(name):
    """protocol.choose, applied to the counts and flags of results/*_lr_search.csv, picks the rates (and
    runner-ups) the sweep used: the rule is what made the table."""
    out = storage.Outputs(name)
    search, saved = pd.read_csv(out.lr_search), json.loads(out.learning_rates.read_text())
    if "flag" not in search:
        pytest.skip(f"{out.lr_search.name} predates the flags of issue 32 (its tables are re-run on the GPU)")
    for method, g in search.groupby("method", sort=False):
        g = g.sort_values("lr")
        counts = [[int(c) for c in str(v).split()] for v in g.val_correct]
        c = protocol.choose(g.lr.tolist(), counts, g.flag.fillna("").tolist())
        assert c.lr == saved["chosen"][method] and c.runner_up == saved["runner_up"].get(method), method


def test_the_first_screen_is_the_generated_headline_and_the_makefiles_commands():
    """What a newcomer reads before the full table: how to run it, the time, the figure, a table that is
    results.csv's, three generated sentences and lora.py in five lines; every command in it is a Makefile target
    or a file the venv has."""
    readme = (ROOT / "README.md").read_text()
    first = readme.split("## The MLP experiment in full")[0]
    assert len(first.splitlines()) <= 60
    start, end = report.readme_markers("mlp", "headline")
    assert f"{start}\n{sentences.headline(storage.load_results(storage.Outputs('mlp')))}\n{end}" in first
    start, end = report.readme_markers("mlp", "time")
    assert f"{start}\n{report.run_times(storage.RUN_TIMES)}\n{end}" in first
    assert "![" in first and "parameters_vs_accuracy.png" in first
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    assert set(re.findall(r"^make (\w+)", first, re.M)) == {"run"} <= targets
    for tool in re.findall(r"^\.venv/bin/(\w+)", first, re.M):  # jupyter: from requirements.txt's jupyter
        assert tool in {"jupyter"} and "jupyter==" in (ROOT / "requirements.txt").read_text()
    if (ROOT / ".venv" / "bin").is_dir():
        assert (ROOT / ".venv" / "bin" / "jupyter-lab").is_file() and (ROOT / ".venv" / "bin" / "jupyter-notebook").is_file()
    code = first.split("```python")[1].split("```")[0].strip().splitlines()
    assert len(code) == 5 and code[0].startswith("import lora")


def test_the_selection_rule_reads_the_same_in_the_readme_and_the_notebooks():
    assert report.RULE in (ROOT / "README.md").read_text()
    for name in ("mlp", "text"):
        assert any(report.RULE in c.source for c in nbformat.read(NOTEBOOKS[name], as_version=4).cells), name


def test_the_readme_gives_the_size_of_the_virtual_environment_as_it_is():
    venv = ROOT / ".venv"
    if not (venv / "installed").is_file():
        pytest.skip("no installed .venv to measure")
    size = lambda root: sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    total, nvidia = size(venv), size(next(venv.glob("lib/python*/site-packages/nvidia")))
    said = re.search(r"\(([\d.]+) GB, of which ([\d.]+) GB are NVIDIA's CUDA libraries", (ROOT / "README.md").read_text())
    assert said, "the README's sentence on the venv's size"
    assert abs(float(said[1]) - total / 2 ** 30) < 0.4 and abs(float(said[2]) - nvidia / 2 ** 30) < 0.3


def test_every_file_and_make_target_the_readme_names_exists():
    readme = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"`([\w./-]+\.(?:py|ipynb|csv|json|png|md))`", readme))
    paths |= set(re.findall(r"\]\(([\w./-]+\.(?:py|ipynb|csv|json|png|md))\)", readme))  # links and images
    assert {"lora.py", "results.csv", "parameters_vs_accuracy.png"} <= paths
    missing = sorted(p for p in paths if not any((ROOT / d / p).exists() for d in (".", "bench", "tests", "experiments",
                                                                      "experiments/mnist", "experiments/text")))
    assert not missing, f"README names files that do not exist: {missing}"
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    commands = set(re.findall(r"^make (\w+)", readme, re.M))
    assert {"run", "test"} <= commands <= targets, (commands, targets)


def test_the_readme_facts_in_fixed_words_hold_for_the_mlp_experiment():
    """The sentences outside the generated blocks state only what no run can change: the architecture, the
    tuning seeds, alpha = r and DoRA's extra parameters."""
    results = storage.load_results(storage.Outputs("mlp")).set_index("method")
    full = results.loc["full"]
    assert full.trainable_params == (784 * 64 + 64) + (64 * 64 + 64) + (64 * 5 + 5)  # "MLP (784→64→64→5)"
    assert json.loads(storage.Outputs("mlp").config.read_text())["config"]["tune_seeds"] == 5  # "five tuning seeds"
    lora = results[(results.index != "full") & ~results.dora.astype(bool) & ~results.nf4.astype(bool)]
    dora = results[results.dora.astype(bool)]
    assert (dora.trainable_params.to_numpy() - lora.trainable_params.to_numpy() == 133).all()  # notebook: "133"


def test_the_generated_findings_say_what_the_verdicts_say():
    """sentences.findings, on a table made up so that each verdict is known: below, below within the margin,
    within, not distinguishable, above; borderline and rate-sensitive ones named as such; a failed row named once
    and left out of every other sentence."""
    rows = [("full", None, False, 0.98, 0, 0, 0, "", False),
            ("lora_r1", 1, False, 0.90, -0.08, -0.09, -0.07, "below", False),
            ("lora_r4", 4, False, 0.977, -0.003, -0.0045, -0.002, "below, within ±0.5", False),
            ("lora_r16", 16, False, 0.979, -0.001, -0.004, 0.002, "within ±0.5", True),
            ("lora_r32", 32, False, 0.978, -0.002, -0.012, 0.008, "not distinguishable (borderline)", False),
            ("dora_r1", 1, True, 0.91, -0.07, -0.08, -0.06, "below", False),
            ("dora_r4", 4, True, 0.976, -0.004, -0.0049, -0.001, "below, within ±0.5", False),
            ("dora_r16", 16, True, 0.981, 0.001, 0.0005, 0.0015, "above, within ±0.5", False)]
    results = pd.DataFrame([{"method": m, "rank": r, "targets": "all" if r else None, "dora": d, "nf4": False,
                             "acc_B_mean": acc, "acc_B_std": 0.001, "diff_vs_full": dm, "diff_vs_full_low": lo,
                             "diff_vs_full_high": hi, "verdict_vs_full": v, "rate_sensitive_vs_full": rs,
                             "pct_params_vs_full": 10.0 * (r or 10), "seeds": 10,
                             "diff_vs_lora": 0.01 if d else None, "diff_vs_lora_low": 0.005 if d else None,
                             "diff_vs_lora_high": 0.015 if d else None, "verdict_vs_lora": "above" if d else "",
                             "rate_sensitive_vs_lora": False}
                            for m, r, d, acc, dm, lo, hi, v, rs in rows])
    text = sentences.findings(results, show_targets=False)
    assert ("LoRA is below full finetuning at rank 1, is below it but within ±0.5 points of it at rank 4, is within "
            "±0.5 points of it at rank 16* and is not distinguishable from it (borderline) at rank 32.") in text
    assert ("DoRA is below full finetuning at rank 1, is below it but within ±0.5 points of it at rank 4 and is above "
            "it but within ±0.5 points of it at rank 16.") in text
    assert "The smallest rank whose interval lies within the margin is 4 (40% of full finetuning's parameters, -0.30 (-0.45 to -0.20) points)" in text
    assert "1 of these 4 verdicts is borderline" in text and "1 is rate-sensitive (*" in text
    assert "From rank 4 on its means lie within a quarter point of its best (0.9770 to 0.9790)." in text
    assert "DoRA is above LoRA at ranks 1, 4 and 16" in text and "(3 paired comparisons in that column)" in text
    assert "match" not in text and "closes" not in text
    falls_again = results.copy()  # LoRA's largest rank a point below its best: no rank from which it is flat
    falls_again.loc[falls_again.method == "lora_r32", "acc_B_mean"] = 0.967
    text = sentences.findings(falls_again, show_targets=False)
    assert "LoRA is below full finetuning at rank 1" in text and "From rank 4 on its means" not in text
    assert "failed" not in text  # no diverged_mean column: nothing said
    falls_again["diverged_mean"], falls_again["lr"] = 0.0, 0.01
    falls_again["rank"] = falls_again["rank"].astype("Int64")  # as summarize writes it
    falls_again.loc[falls_again.method == "lora_r1", ["diverged_mean", "lr", "verdict_vs_full"]] = (0.6, 0.1, "")
    text = sentences.findings(falls_again, show_targets=False)
    assert text.count("failed") == 1 and "LoRA r=1 failed on 6 of 10 seeds at its learning rate 0.1" in text
    assert not re.search(r"at ranks? 1\b", text.split("no verdict or sentence here rests on it.")[1].split("DoRA")[0])



def test_the_transformer_notebook_pairs_target_sets_at_the_parameter_count_it_names():
    r = storage.load_results(storage.Outputs("transformer")).set_index("method")
    assert r.loc["lora_qkvo_r4", "trainable_params"] == r.loc["lora_qv_r8", "trainable_params"] == 2_213


def test_the_bench_readme_quotes_bench_results():
    """Every decimal (and every number of three or more digits) in bench/README.md's table of measurements is,
    to its printed digits, a number recorded in bench/RESULTS.md; PEFT's ratio to the frozen layer is computed."""
    readme = (ROOT / "bench" / "README.md").read_text()
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    recorded = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", results)]
    section = readme.split("## What was measured")[1].split("## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # below the header and |---|
    measured = " ".join(line.rsplit("|", 2)[0] for line in rows)  # without the last column, the targets
    quoted = re.findall(r"(?<![\w.])\d+\.\d+|(?<![\w.])\d{3,}(?![\w.])", measured)
    assert len(quoted) > 20
    for q in quoted:
        digits = len(q.split(".")[1]) if "." in q else 0
        assert any(round(x, digits) == float(q) for x in recorded), f"{q} is not in bench/RESULTS.md"
    layer = results.split("### 4. LoRALinear")[1].split("Inference")[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in layer.splitlines() if re.match(r"\| \d", line)]
    peft_vs_frozen = [float(r[4]) / float(r[2]) for r in rows]
    claim = f"PEFT's layer runs at {min(peft_vs_frozen):.2f}–{max(peft_vs_frozen):.2f}× the frozen one"
    assert claim in " ".join(readme.split())


def test_every_lora_run_used_alpha_equal_to_r():
    """The README: "The experiments use alpha = r (scaling 1)"."""
    for name in EXPERIMENTS:
        results = storage.load_results(storage.Outputs(name))
        lora = results[results["rank"].notna()]
        assert len(lora) and (lora.alpha == lora["rank"]).all(), name


def test_the_speed_history_quotes_bench_results():
    """bench/README.md's history of issue 19's speed-up, each claim next to the bench/RESULTS.md record it rounds."""
    readme = " ".join((ROOT / "bench" / "README.md").read_text().split())
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    before, after = results.split("## Issue 19: before")[1].split("## Issue 19: after")
    claims = {"MLP's search takes 75 s and its sweep 53 s": (after, ["**75.15**", "**52.64**"]),
              "(from 154 s and 98 s; same scripts)": (before, ["154.40", "97.50"]),
              "the transformer's 199 s and 71 s": (after, ["**199.06**", "**71.16**"]),
              "(from 481 s and 124 s)": (before, ["481.49", "123.67"]),
              "the MLP's search takes 7 s and its sweep 6 s": (after, ["**6.76**", "**6.44**"]),
              "the MLP sweep runs 3.02× faster than a plain loop": (after, ["**3.02x**"])}
    for claim, (section, records) in claims.items():
        assert claim in readme, claim
        for record in records:
            assert record in section, (claim, record)


def test_the_readme_compares_with_the_reference_notebook_rank_by_rank_and_counts_its_steps():
    readme = " ".join((ROOT / "README.md").read_text().split())
    ours = storage.load_results(storage.Outputs("mlp")).set_index("method").acc_B_mean
    ref = {r: acc for r, (_, acc) in REFERENCE.items() if r != "full"}
    for r, acc in ref.items():  # the MLP block's last sentence, rank by rank
        assert f"r={r}: {ours[f'lora_r{r}']:.3f} against {acc:.3f}" in readme
    # Steps: the reference trained at batch 64 for at most 100 epochs on the digits 5-9 of its 55,000-image split;
    # ours of the same size stands in for its random split ("about 421" steps an epoch).
    cfg = Config()
    n = len(tasks.load_tasks(cfg, torch.device("cpu"))["B"]["train"][1])
    ours_steps, reference_steps = cfg.finetune_epochs * (n // cfg.batch_size), 100 * (n // 64)
    assert (n // 64, reference_steps, ours_steps, round(reference_steps / ours_steps)) == (421, 42_100, 1_050, 40)
    assert "100 × about 421 ≈ 42,100 steps, about 40× the 1,050 each method takes here" in readme


def test_the_committed_results_record_their_environment_and_the_quick_start_is_on_the_first_screen():
    readme = (ROOT / "README.md").read_text()
    for name in ("mlp", "transformer"):
        env = json.loads(storage.Outputs(name).config.read_text())["environment"]
        assert {"python", "torch", "device", "device_name", "cpu_threads"} <= env.keys(), name
    quick_start = readme.splitlines().index("```python")
    assert quick_start < 60, "the lora.py quick start must stay within the README's first screen"


def test_the_readme_qlora_numbers_are_the_qlora_notebooks_outputs():
    readme = (ROOT / "README.md").read_text()
    part = " ".join(readme.split("## QLoRA")[1].split("```")[0].split())
    cells = code_cells(nbformat.read(ROOT / "lora_qlora.ipynb", as_version=4))
    printed = "".join(o.get("text", "") for c in cells for o in c.outputs)
    errors = re.search(r"all 36 linears, mean: NF4 ([\d.]+)%\s+int4 ([\d.]+)%\s+16 even levels ([\d.]+)%", printed)
    sizes = re.search(r"36 linears: ([\d.]+) MiB in float32 -> ([\d.]+) MiB in NF4, ([\d.]+) bits per weight", printed)
    sweep = re.search(r"^64\s+([\d.]+)\s+([\d.]+)%\s+[\d.]+\s+([\d.]+)%$", printed, re.MULTILINE)
    saved = re.search(r"autograd saved ([\d.]+) MiB for backward", printed)
    saved_plain = re.search(r"plain autograd saves ([\d.]+) MiB", printed)
    batch = re.search(r"tokens = torch.randint\(1000, 5000, \((\d+), (\d+)\)\)", "".join(c.source for c in cells))
    assert errors and sizes and sweep and saved and saved_plain and batch
    assert errors[1] == sweep[2]                                    # sections 4 and 7: the same setting, the same error
    assert (f"With blocks of 64 and no double quantization ({sweep[1]} bits per weight), NF4's error over the 36 "
            f"linears is {errors[1]}% of the weights' RMS, against {errors[2]}% for int4 (−7…7, with a zero) and "
            f"{errors[3]}% for 16 evenly spaced levels (no zero). Double quantization brings NF4 to {sizes[3]} bits "
            f"per weight ({sizes[1]} MiB of float32 weights in {sizes[2]} MiB) and moves its error from {sweep[2]}% "
            f"to {sweep[3]}%.") in part
    assert (f"at batch {batch[1]} × {batch[2]} keeps {saved[1]} MiB for backward, against {saved_plain[1]} MiB") in part


def test_the_readmes_qlora_step_time_is_bench_results():
    readme = " ".join((ROOT / "README.md").read_text().split("## QLoRA")[1].split("##")[0].split())
    bench = (ROOT / "bench" / "RESULTS.md").read_text().split("### QLoRA: the LoRA step over an NF4 base")[1]
    bench = bench.split("\n### ")[0]                                 # this section's tables only
    rows = {line.split("|")[1].strip(): line.split("|") for line in bench.splitlines() if line.startswith("| ")}
    ratio, peak = rows["NF4 LinearNF4 eager"][4].strip().strip("*"), rows["NF4 LinearNF4 eager"][5].strip()
    assert "NVIDIA H200, torch 2.11" in bench.splitlines()[2] and "d_in = d_out = 4096" in bench
    assert (f"with torch 2.11 on an H200 the LoRA step over a 4096 × 4096 NF4 layer takes {ratio} the bf16 step's "
            f"time (a ratio of step times), its peak memory {peak} MiB against {rows['bf16 nn.Linear'][5].strip()}") in readme
    assert "torch-only dequantize, not bitsandbytes' CUDA kernel" in readme


def test_the_readmes_replicate_counts_are_the_recorded_replicates():
    """The README's agreement counts for the replicate on disjoint seeds are the ones bench/replicate.py recorded
    in bench/RESULTS.md (the last such section), column by column."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    sections = (ROOT / "bench" / "RESULTS.md").read_text().split("### Replicate: mlp on seeds 10-19")
    assert len(sections) > 1, "no replicate recorded (python bench/replicate.py --experiment mlp --first-seed 10)"
    section = sections[-1].split("\n###")[0]
    for column in ("against full finetuning", "against LoRA"):
        count = re.search(rf"Verdicts {column}: (\d+) of (\d+) agree", section)
        assert count, column
        assert f"{count[1]} of {count[2]} verdicts {column}" in readme, column

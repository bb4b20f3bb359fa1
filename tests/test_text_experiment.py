"""The text experiment on a tiny config, on the CPU: stacked training equals one model at a time (QLoRA's too),
the schedule, the protocol's files for both budgets, the table across tasks, bad configs refused before training,
an interrupted sweep resumed, a run stopped before its deadline."""

import copy
import dataclasses
import json
import time

import pandas as pd
import pytest
import torch

import lora
import nf4
from experiments import protocol, storage, trainer
from experiments.methods import Method
from experiments.plain_loop import plain_fit
from experiments.text import records, run, stacked, table
from experiments.text.config import TextConfig
from experiments.text.experiment import (TextExperiment, build_model, features, fit_stacked, load_setup,
                                         train_stacked)

CPU = torch.device("cpu")
QUICK = dataclasses.replace(TextConfig.quick(), epochs=2)  # a few more steps for the equality tests


@pytest.fixture(scope="module")
def float32_setup():
    return load_setup(QUICK, CPU, dropout=False)


@pytest.fixture
def setup_without_dropout(float32_setup):
    """The tiny setup in float64, dropout off. Adam's first update is lr * g / (|g| + eps), whose slope where |g| is
    near eps = 1e-8 is lr / (4 eps): it magnifies tiny differences in the gradient 25,000-fold at lr = 1e-3, and
    once weights differ, later gradients differ. Measured after 8 steps: LoRA and the probe within 2e-8; full
    finetuning within 1.1e-6 everywhere but in the word embeddings' rarely seen rows, 7.3e-5 at lr 3e-3 (2.4% of one
    step). A wrong batch, seed or learning rate moves a weight by about one step: lr."""
    torch.set_default_dtype(torch.float64)  # the new heads and LoRA's A and B follow it
    try:
        yield dataclasses.replace(float32_setup, encoder=copy.deepcopy(float32_setup.encoder).double())
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """run.run_task on the Rotten Tomatoes quick config (search, both budgets' sweeps, every file), with a run cache
    of its own; then the learning rates the equal budget chose, and the sweep at them."""
    root = tmp_path_factory.mktemp("text")
    exp = TextExperiment(TextConfig.quick(), CPU)
    out = storage.Outputs(exp.name, root)
    summaries = run.run_task(exp, root, root / "runs")
    chosen = json.loads(out.learning_rates.read_text())["chosen"]
    per_seed = protocol.sweep(exp, chosen, root / "runs", progress=False)  # every job from the cache
    return exp, root, out, chosen, per_seed, summaries


def test_the_methods_are_the_probe_full_finetuning_lora_on_the_target_sets_and_qlora():
    assert [m.name for m in TextConfig.default("rotten_tomatoes").methods] == [
        "head", "full", "lora_qv_r1", "lora_qv_r2", "lora_qv_r4", "lora_qv_r8", "lora_qv_r16", "lora_qkvo_r8",
        "lora_all_r8", "qlora_qv_r8", "qlora_all_r8"]
    imdb = TextConfig.default("imdb")
    assert [m.name for m in imdb.methods] == ["head", "full", "lora_qv_r1", "lora_qv_r8", "lora_all_r8"]
    assert imdb.curve_methods == imdb.methods  # IMDB runs the curves' methods only


def test_the_schedule_warms_up_then_decays_linearly_to_zero_over_the_maximum():
    total, w = 100, trainer.warmup_steps(100)
    assert [trainer.lr_factor(s, total, linear_decay=True) for s in range(w)] == [(s + 1) / w for s in range(w)]
    for s in range(w, total):
        assert trainer.lr_factor(s, total, linear_decay=True) == 1 - (s - w) / (total - w)


@pytest.mark.parametrize("field, value, message", [
    ("max_len", 600, r"max_len must be an int in \[3, 512\]"), ("task", "sst2", "task must be one of"),
    ("ranks", (4, 4), "ranks must be distinct"), ("ranks", (500,), "ranks must be at most 384"),
    ("lr_grid", (), "lr_grid must be"), ("batch_size", 0, "batch_size must be a positive int, got 0"),
    ("test_size", 8000, "cannot split 8530 rotten_tomatoes reviews"),
    ("train_size", 2, "train_size=2 is smaller than batch_size=32"),
    ("wide_targets", ("qv",), "wide_targets must be distinct keys"),
    ("qlora", 1, "qlora must be a bool"),
])
def test_an_impossible_config_is_refused_before_any_training(field, value, message):
    with pytest.raises(ValueError, match=message):
        TextConfig(**{field: value})


def test_qlora_is_refused_without_its_float32_twin():
    with pytest.raises(ValueError, match="qlora compares with LoRA at the same rank"):
        TextConfig(qlora=True, ranks=(1, 2))


def test_the_default_splits_are_the_issues_sizes():
    rt, imdb = TextConfig.default("rotten_tomatoes"), TextConfig.default("imdb")
    assert (rt.val_size, rt.test_size, rt.train_size) == (1066, 1066, None)  # 6,398 train
    assert (imdb.val_size, imdb.test_size, imdb.train_size, imdb.max_len) == (1000, 5000, None, 128)  # all 18,904


def trained_one_at_a_time(setup, method, lr, seed):
    """The reference: one Hugging Face model with lora.py, trained by the plain loop."""
    torch.manual_seed(seed)
    model = build_model(setup, method)
    ids, y = setup.splits["train"]
    plain_fit(model, (ids, (ids != 0).long()), y, seed, lr, QUICK.epochs, QUICK.batch_size, linear_decay=True)
    return model


@pytest.mark.parametrize("method", [Method("lora", 2, "qv"), Method("lora", 1, "all"), Method("full"),
                                    Method("head")], ids=lambda m: m.name)
def test_stacked_training_equals_one_model_at_a_time_without_dropout(setup_without_dropout, method):
    setup, lrs, seeds = setup_without_dropout, [1e-3, 3e-3], [0, 1]
    feats = features(setup, QUICK) if method.kind == "head" else None
    params, *_ = fit_stacked(QUICK, setup, method, lrs, seeds, feats)
    for i, (lr, seed) in enumerate(zip(lrs, seeds)):
        reference = dict(trained_one_at_a_time(setup, method, lr, seed).named_parameters())
        for name, p in params.items():  # the probe's stacked tensors are its head's: "weight", "bias"
            if p.requires_grad:
                key = f"head.{name}" if method.kind == "head" else name
                assert p.dtype == torch.float64
                atol = 0.05 * lr if name.endswith("word_embeddings.weight") else 5e-6
                torch.testing.assert_close(p[i].detach(), reference[key], rtol=1e-6, atol=atol)
    assert any(p.requires_grad for p in params.values())


def test_the_stacked_function_computes_what_bert_model_computes(setup_without_dropout):
    setup = setup_without_dropout
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model(setup, Method("lora", 2, "qkvo")).eval()
        for _, layer in lora.lora_layers(m):
            torch.nn.init.normal_(layer.lora_B)  # B = 0 would hide a wrong A
        models.append(m)
    ids = setup.splits["val"][0]
    with torch.no_grad():
        logits = stacked.forward(stacked.stack_models(models), ids.expand(2, -1, -1), setup.encoder.config, False)
        for i, m in enumerate(models):
            torch.testing.assert_close(logits[i], m(ids, (ids != 0).long()), rtol=1e-6, atol=1e-9)


def test_the_stacked_function_over_an_nf4_base_computes_what_lora_over_linear_nf4_computes(float32_setup):
    """QLoRA's stacked models multiply by the dequantized NF4 weights: the very W each LinearNF4 uses (float32: NF4
    quantizes float32, bfloat16 or float16 weights only)."""
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model(float32_setup, Method("lora", 2, "all", nf4=True)).eval()
        for _, layer in lora.lora_layers(m):
            torch.nn.init.normal_(layer.lora_B, std=0.02)  # B = 0 would hide a wrong A
        models.append(m)
    assert sum(1 for _ in lora.lora_layers(models[0])) == 36 and nf4.nf4_bytes(models[0]) > 0
    ids = float32_setup.splits["val"][0]
    with torch.no_grad():
        logits = stacked.forward(stacked.stack_models(models), ids.expand(2, -1, -1), float32_setup.encoder.config,
                                 False)
        for i, m in enumerate(models):
            torch.testing.assert_close(logits[i], m(ids, (ids != 0).long()), rtol=1e-5, atol=1e-5)
        plain = build_model(float32_setup, Method("lora", 2, "all")).eval()
        assert not torch.allclose(plain(ids, (ids != 0).long()), models[0](ids, (ids != 0).long()))


def test_tuning_never_scores_the_test_reviews(quick_run):
    exp, root, out, *_ = quick_run
    grid = pd.read_csv(out.lr_search)
    assert set(grid.method) == {m.name for m in exp.methods}
    records_ = train_stacked(exp.cfg, exp.setup(), Method("lora", 1, "qv"), [1e-3], [100], test=False)
    assert records_[0]["test_acc"] != records_[0]["test_acc"] and 0 <= records_[0]["val_acc"] <= 1  # nan
    assert not {"test_correct", "test_bits_epochs", "val_bits_epochs"} & set(records_[0])
    assert len(records_[0]["val_correct_epochs"]) == len(records_[0]["epoch_losses"]) == exp.cfg.epochs


def test_the_run_writes_every_file_of_both_budgets_and_the_loss_goes_down(quick_run):
    exp, root, out, chosen, per_seed, summaries = quick_run
    task = exp.cfg.task
    for path in (out.lr_search, out.learning_rates, out.config, records.search_path(root, task),
                 records.runs_path(root, task), *(records.summary_path(root, task, b) for b in records.BUDGETS),
                 *(run.figure_path(root, task, b) for b in records.BUDGETS), root / "results" / f"text_{task}_curves.png"):
        assert path.is_file(), path
    assert len(per_seed) == exp.cfg.seeds * len(exp.methods)
    assert (per_seed.groupby("method").loss_last_epoch.mean() <= per_seed.groupby("method").loss_first_epoch.mean()
            + 0.05).all()
    config = json.loads(out.config.read_text())
    assert config["data"]["train"]["reviews"] == exp.cfg.train_size and len(config["data"]["csv_sha256"]) == 64
    assert config["steps_per_epoch"] == exp.cfg.train_size // exp.cfg.batch_size and 0 <= config["tokens_cut"] < 1
    runs = pd.read_csv(records.runs_path(root, task))
    assert set(runs.epoch) == set(range(1, exp.cfg.epochs + 1)) and set(runs.seed) == set(range(exp.cfg.seeds))
    for budget, summary in summaries.items():
        assert list(summary.method) == [m.name for m in exp.methods], budget
        assert summary.steps.tolist() == (summary.epoch * config["steps_per_epoch"]).tolist()
    assert (summaries["equal"].epoch == exp.cfg.epochs).all()
    qlora = summaries["equal"].set_index("method").loc["qlora_qv_r2"]
    assert not pd.isna(qlora.diff_vs_float) and qlora.nf4


def test_the_equal_budget_chooses_what_the_protocols_search_chose(quick_run):
    exp, root, out, chosen, *_ = quick_run
    search, _ = records.read(root, exp.cfg.task)
    assert {m: lr for m, (lr, _) in records.choose_equal(search, 2, exp.cfg.epochs, exp.cfg.val_size).items()} == chosen


def test_text_csv_has_one_row_per_task_and_method_and_the_readme_block_comes_from_it(quick_run):
    exp, root, *_ = quick_run
    combined = table.combine(root)
    assert list(combined.columns[:7]) == ["task", "method", "rank", "targets", "trainable_params", "acc_mean",
                                          "acc_std"]
    assert {"seeds", "diff_vs_full", "diff_vs_full_low", "diff_vs_full_high", "epoch", "steps"} <= set(combined.columns)
    assert list(combined.method) == [m.name for m in exp.methods] and set(combined.task) == {"rotten_tomatoes"}
    assert (root / "results" / "text_own.csv").is_file()
    block = table.readme_block(root)
    for budget in records.BUDGETS:
        for _, r in table.load(root, budget).iterrows():
            assert f"{100 * r.acc_mean:.2f} ± {100 * r.acc_std:.2f}" in block
    assert "**Rotten Tomatoes**, every method read at the last epoch (" in block and "simultaneous intervals" in block
    assert "**Rotten Tomatoes**, each method at the rate and epoch chosen on validation" in block
    assert "QLoRA on Wq, Wv, r=2" in block and "not reproduced" not in block


def test_an_interrupted_sweep_resumes_from_the_cache(quick_run, tmp_path, monkeypatch):
    exp, root, out, chosen, per_seed, _ = quick_run
    trained = []
    original = TextExperiment.train

    def counting(self, shared, method, lrs, seeds):
        trained.append(method.name)
        return original(self, shared, method, lrs, seeds)
    monkeypatch.setattr(TextExperiment, "train", counting)

    def stop_after_two(i):
        if i == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        protocol.sweep(exp, chosen, tmp_path, progress=False, after_each=stop_after_two)
    assert trained == [m.name for m in exp.methods[:2]]
    again = protocol.sweep(exp, chosen, tmp_path, progress=False)
    assert trained[2:] == [m.name for m in exp.methods[2:]]  # the two finished jobs came from the cache
    pd.testing.assert_frame_equal(again.drop(columns="seconds"), per_seed.drop(columns="seconds"))


def test_a_run_refuses_a_job_it_cannot_finish_before_its_deadline(tmp_path):
    exp = run.TimedTextExperiment(TextConfig.quick(), CPU, deadline=time.monotonic() + 1.0)
    with pytest.raises(run.OutOfTime, match="needs about"):
        protocol.tune(exp, tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.pt"))  # nothing half-done in the cache

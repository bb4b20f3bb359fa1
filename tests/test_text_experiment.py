"""The text experiment: config, methods, runs, files and the command line, on a tiny config."""

import json

import pytest
import torch

import lora
from experiments import protocol, report, storage
from experiments.__main__ import main as cli
from experiments.methods import Method
from experiments.text import experiment as text_experiment
from experiments.text.config import TextConfig
from experiments.text.experiment import TextExperiment

CPU = torch.device("cpu")
QUICK = TextConfig.quick()


@pytest.fixture(scope="module")
def exp():
    return TextExperiment(QUICK, CPU)


@pytest.fixture(scope="module")
def text_setup(exp):
    return exp.setup()


@pytest.fixture(scope="module")
def quick_run(exp, tmp_path_factory, run_pipeline):
    out = storage.Outputs("text", tmp_path_factory.mktemp("text"))
    return out, *run_pipeline(exp, out)


def test_the_methods_are_the_probe_full_finetuning_and_lora_on_three_target_sets():
    names = [m.name for m in TextConfig().methods]
    assert names == ["head", "full", "lora_qv_r1", "lora_qv_r2", "lora_qv_r4", "lora_qv_r8", "lora_qv_r16",
                     "lora_qkvo_r8", "lora_all_r8"]
    streams = [m.dropout_seed for m in TextConfig().methods]
    assert len(set(streams)) == len(streams)


@pytest.mark.parametrize("field, value, message", [
    ("max_len", 600, "max_len must be an int in [3, 512]"), ("val_fraction", 1.0, "val_fraction must be"),
    ("ranks", (4, 4), "ranks must be distinct"), ("lr_grid", (), "lr_grid must be"),
    ("batch_size", 0, "batch_size must be a positive int, got 0"), ("test_subset", -1, "test_subset must be"),
])
def test_bad_config_values_are_refused_with_what_was_given(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TextConfig(**{field: value})


def test_the_splits_are_disjoint_and_the_test_reviews_are_apart(text_setup):
    train, val = (set(map(tuple, text_setup.splits[s][0].tolist())) for s in ("train", "val"))
    assert len(text_setup.splits["train"][2]) == len(text_setup.splits["val"][2]) == QUICK.train_subset
    assert not set(text_setup.texts["train"]) & set(text_setup.texts["val"])
    assert len(text_setup.splits["test"][2]) == QUICK.test_subset


def test_each_method_trains_exactly_what_it_should(text_setup):
    for method, trainable in [(Method("head"), {"head.weight", "head.bias"}),
                              (Method("lora", 2, "qv"), None), (Method("full"), None)]:
        model = text_experiment.build_model(text_setup, method)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if method.kind == "head":
            assert names == trainable
        elif method.kind == "lora":
            assert names == {"head.weight", "head.bias"} | {n for n in names if n.endswith(("lora_A", "lora_B"))}
            assert lora.count_parameters(model)[0] == 6 * 2 * 2 * (384 + 384) + 770
        else:
            assert names == {n for n, _ in model.named_parameters()}


def test_every_method_of_a_seed_starts_from_the_same_head_and_a_fresh_copy_of_the_encoder(text_setup):
    heads = []
    for method in QUICK.methods:
        torch.manual_seed(7)
        model = text_experiment.build_model(text_setup, method)
        heads.append(model.head.weight.detach().clone())
        assert model.encoder is not text_setup.encoder
    assert all(torch.equal(h, heads[0]) for h in heads)


def test_training_moves_the_loss_down_and_leaves_the_pretrained_encoder_untouched(text_setup):
    before = {k: v.clone() for k, v in text_setup.encoder.state_dict().items()}
    cfg = TextConfig(**{**QUICK.__dict__, "epochs": 4})
    run = text_experiment.train_run(cfg, text_setup, Method("full"), 1e-4, seed=0)
    assert run["loss_last_epoch"] < run["loss_first_epoch"]
    assert all(torch.equal(v, text_setup.encoder.state_dict()[k]) for k, v in before.items())


def test_the_quick_pipeline_writes_every_file_and_the_summary_is_the_per_seed_rows(quick_run):
    out, grid, chosen, per_seed, results = quick_run
    assert len(grid) == len(QUICK.methods) * len(QUICK.lr_grid) and set(chosen.values()) <= set(QUICK.lr_grid)
    assert len(per_seed) == len(QUICK.methods) * QUICK.seeds
    for path in out.all():
        assert path.stat().st_size > 0 and path.parent == out.root / "results", path
    saved = storage.load_results(out)
    assert list(saved.columns) == ["method", "rank", "targets", "dora", "alpha", "trainable_params",
                                   "pct_params_vs_full", "test_acc_mean", "test_acc_std", "pct_acc_vs_full",
                                   "diff_vs_full", "diff_vs_full_low", "diff_vs_full_high", "diff_vs_lora",
                                   "diff_vs_lora_low", "diff_vs_lora_high", "seeds", "epochs", "batch_size",
                                   "max_len", "lr"]
    wide = per_seed.pivot(index="seed", columns="method", values="test_acc")
    row = results.set_index("method").loc["lora_qv_r1"]
    assert row.diff_vs_full == pytest.approx((wide["lora_qv_r1"] - wide["full"]).mean())
    config = json.loads(out.config.read_text())
    assert config["weights"]["sha256"] and config["data"]["test"] == QUICK.test_subset
    assert config["libraries"]["transformers"] and config["config"]["max_len"] == QUICK.max_len
    assert "| linear probe (head only) | 770 |" in TextExperiment(QUICK, CPU).readme_block(saved, config)


def test_learning_rates_are_chosen_on_validation_with_ties_going_to_the_smallest_lr(quick_run):
    _, grid, chosen, _, _ = quick_run
    for method, rows in grid.groupby("method"):
        best = rows[rows.val_acc_mean == rows.val_acc_mean.max()]
        assert chosen[method] == best.lr.min(), method


def test_a_cached_run_is_loaded_not_retrained(quick_run, exp, monkeypatch):
    out = quick_run[0]
    monkeypatch.setattr(text_experiment, "train_run", lambda *a: pytest.fail("trained again"))
    protocol.sweep(exp, quick_run[2], out.root / "runs", progress=False)


def test_the_discussion_gives_each_methods_verdict_from_its_interval(quick_run):
    results = quick_run[4]
    text = text_experiment.discussion(results, 0.7)
    for _, r in results[results.method != "full"].iterrows():
        assert f"{report.verdict(r.diff_vs_full_low, r.diff_vs_full_high)} full finetuning" in text


def test_without_a_gpu_make_run_skips_the_text_experiment_and_keeps_the_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = storage.Outputs("text", tmp_path)
    storage.write_json(out.config, {"tune_seconds": 100.0, "sweep_seconds": 50.0,
                                    "environment": {"device_name": "NVIDIA H100 80GB HBM3"}})
    before = out.config.read_bytes()
    with pytest.raises(SystemExit) as e:
        cli(["has-gpu", "--experiment", "text", "--out", str(tmp_path)])
    assert e.value.code == 1  # make run's `if` reads it as "no GPU"
    said = capsys.readouterr().out
    assert "needs a CUDA GPU" in said and "150 s on NVIDIA H100" in said and "make text" in said
    assert out.config.read_bytes() == before and not out.summary.exists()

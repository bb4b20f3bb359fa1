"""The text experiment (issue 9): config, methods, runs, paired statistics, files and the CLI, on a tiny config."""

import json
import math

import pandas as pd
import pytest
import torch

import lora
import stats
import storage
import text_experiment
import text_report
import text_runs
from config import Method
from text_config import TextConfig

CPU = torch.device("cpu")
QUICK = TextConfig.quick()


@pytest.fixture(scope="module")
def task():
    return text_runs.load_task(QUICK, CPU)


@pytest.fixture(scope="module")
def quick_run(task, tmp_path_factory):
    out = storage.Outputs("text", tmp_path_factory.mktemp("text"))
    grid, chosen = text_runs.tune(QUICK, task, out.root / "runs")
    per_seed = text_runs.run_sweep(QUICK, task, chosen, out.root / "runs")
    results = text_experiment.save_outputs(QUICK, task, out, grid, chosen, per_seed)
    return out, grid, chosen, per_seed, results


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


def test_the_splits_are_disjoint_and_the_test_reviews_are_apart(task):
    train, val = (set(map(tuple, task.splits[s][0].tolist())) for s in ("train", "val"))
    assert len(task.splits["train"][2]) == len(task.splits["val"][2]) == QUICK.train_subset
    assert not set(task.texts["train"]) & set(task.texts["val"])
    assert len(task.splits["test"][2]) == QUICK.test_subset


def test_each_method_trains_exactly_what_it_should(task):
    for method, trainable in [(Method("head"), {"head.weight", "head.bias"}),
                              (Method("lora", 2, "qv"), None), (Method("full"), None)]:
        model = text_runs.build_model(task, method)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        if method.kind == "head":
            assert names == trainable
        elif method.kind == "lora":
            assert names == {"head.weight", "head.bias"} | {n for n in names if n.endswith(("lora_A", "lora_B"))}
            assert lora.count_parameters(model)[0] == 6 * 2 * 2 * (384 + 384) + 770
        else:
            assert names == {n for n, _ in model.named_parameters()}


def test_every_method_of_a_seed_starts_from_the_same_head_and_a_fresh_copy_of_the_encoder(task):
    heads = []
    for method in QUICK.methods:
        torch.manual_seed(7)
        model = text_runs.build_model(task, method)
        heads.append(model.head.weight.detach().clone())
        assert model.encoder is not task.encoder
    assert all(torch.equal(h, heads[0]) for h in heads)


def test_training_moves_the_loss_down_and_leaves_the_pretrained_encoder_untouched(task):
    before = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    cfg = TextConfig(**{**QUICK.__dict__, "epochs": 4})
    run = text_runs.train_run(cfg, task, Method("full"), 1e-4, seed=0)
    assert run["losses"][-1] < run["losses"][0]
    assert all(torch.equal(v, task.encoder.state_dict()[k]) for k, v in before.items())


def test_mean_ci_is_students_t_interval():
    mean, low, high = stats.mean_ci([0.80, 0.82, 0.84])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, 2) from a table
    assert mean == pytest.approx(0.82) and (low, high) == pytest.approx((0.82 - half, 0.82 + half))
    assert math.isnan(stats.mean_ci([0.5])[1])


def test_paired_differences_pair_by_seed_not_by_position():
    per_seed = pd.DataFrame({"method": ["full"] * 3 + ["lora"] * 3, "seed": [0, 1, 2, 2, 1, 0],
                             "acc": [0.80, 0.90, 0.70, 0.72, 0.92, 0.82]})
    d = stats.paired_differences(per_seed, "acc").set_index("method")
    assert d.loc["lora", "diff_mean"] == pytest.approx(0.02)
    assert d.loc["lora", "diff_low"] == pytest.approx(0.02) == d.loc["lora", "diff_high"]  # the same +0.02 each seed
    with pytest.raises(ValueError, match="baseline 'nothing'"):
        stats.paired_differences(per_seed, "acc", baseline="nothing")


def test_the_quick_pipeline_writes_every_file_and_the_summary_is_the_per_seed_rows(quick_run):
    out, grid, chosen, per_seed, results = quick_run
    assert len(grid) == len(QUICK.methods) * len(QUICK.lr_grid) and set(chosen.values()) <= set(QUICK.lr_grid)
    assert len(per_seed) == len(QUICK.methods) * QUICK.seeds
    for path in out.all():
        assert path.stat().st_size > 0 and path.parent == out.root / "results", path
    saved = storage.load_results(out)
    for column in ("method", "targets", "rank", "trainable_params", "acc_mean", "acc_std", "seeds", "acc_ci_low",
                   "acc_ci_high", "diff_vs_full", "diff_vs_full_low", "diff_vs_full_high"):
        assert column in saved.columns, column
    wide = per_seed.pivot(index="seed", columns="method", values="test_acc")
    row = results.set_index("method").loc["lora_qv_r1"]
    assert row.diff_vs_full == pytest.approx((wide["lora_qv_r1"] - wide["full"]).mean())
    config = json.loads(out.config.read_text())
    assert config["weights"]["sha256"] and config["data"]["test"] == QUICK.test_subset
    assert config["libraries"]["transformers"] and config["config"]["max_len"] == QUICK.max_len
    assert "| linear probe (head only) | 770 |" in text_report.markdown_table(saved, config)


def test_learning_rates_are_chosen_on_validation_with_ties_going_to_the_lower_loss(quick_run):
    _, grid, chosen, _, _ = quick_run
    for method, rows in grid.groupby("method"):
        best = rows[rows.val_acc_mean == rows.val_acc_mean.max()]
        assert chosen[method] == best.loc[best.val_loss_mean.idxmin(), "lr"], method


def test_a_cached_run_is_loaded_not_retrained(quick_run, task, monkeypatch):
    out = quick_run[0]
    monkeypatch.setattr(text_runs, "train_run", lambda *a: pytest.fail("trained again"))
    text_runs.run_sweep(QUICK, task, quick_run[2], out.root / "runs")


def test_without_a_gpu_make_run_skips_the_text_experiment_and_keeps_the_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = storage.Outputs("text", tmp_path)
    storage.write_json(out.config, {"tune_seconds": 100.0, "sweep_seconds": 50.0,
                                    "environment": {"device_name": "NVIDIA H100 80GB HBM3"}})
    before = out.config.read_bytes()
    with pytest.raises(SystemExit) as e:
        text_experiment.main(["has-gpu", "--out", str(tmp_path)])
    assert e.value.code == 1  # make run's `if` reads it as "no GPU"
    said = capsys.readouterr().out
    assert "needs a CUDA GPU" in said and "150 s on NVIDIA H100" in said and "make text" in said
    assert out.config.read_bytes() == before and not out.summary.exists()

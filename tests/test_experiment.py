"""experiment.py: the protocol, the stacked training, the sweep's files, resume and the CLI (issue 3)."""

import dataclasses
import json

import pandas as pd
import pytest
import torch

import experiment as ex
import lora

CPU = torch.device("cpu")
QUICK = ex.Config.quick()


@pytest.fixture(scope="module")
def tasks():
    return ex.load_tasks(ex.Config(), CPU)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """tune + sweep + files on the quick config, once for the module."""
    out = tmp_path_factory.mktemp("quick")
    grid, chosen = ex.tune(QUICK, CPU, cache_dir=out / "runs", progress=False)
    ex.save_learning_rates(out, QUICK, grid, chosen)
    lrs = ex.load_learning_rates(out, QUICK)
    per_seed = ex.run_sweep(QUICK, lrs, CPU, cache_dir=out / "runs", progress=False)
    results = ex.summarize(per_seed, QUICK)
    ex.save_results(out, QUICK, per_seed, results, ex.plot(results, QUICK), CPU, 1.0)
    return out, grid, lrs, per_seed, results


def test_tasks_are_digits_0_4_and_5_9_relabelled_with_a_disjoint_validation_split(tasks):
    n = {t: {s: len(tasks[t][s][1]) for s in ("train", "val", "test")} for t in "AB"}
    assert n["A"]["test"] == 980 + 1135 + 1032 + 1010 + 982 and n["B"]["test"] == 892 + 958 + 1028 + 974 + 1009
    assert sum(n["A"][s] + n["B"][s] for s in ("train", "val")) == 60_000
    assert n["A"]["val"] + n["B"]["val"] == 5_000
    for t in "AB":
        for s in ("train", "val", "test"):
            x, y = tasks[t][s]
            assert x.shape == (len(y), 784) and x.dtype == torch.float32
            assert set(y.unique().tolist()) == {0, 1, 2, 3, 4}
    train, val = tasks["B"]["train"][0], tasks["B"]["val"][0]
    assert not (torch.cdist(val[:200], train).min(1).values == 0).all()  # not the same images
    x = torch.cat([tasks["A"]["train"][0], tasks["B"]["train"][0]])
    assert x.mean().item() == pytest.approx(0, abs=0.02) and x.std().item() == pytest.approx(1, abs=0.02)


def test_the_model_is_the_reference_architecture():
    assert lora.count_parameters(ex.make_mlp()) == (54_725, 54_725)
    model = ex.make_mlp()
    assert lora.add_lora(model, r=3) == ["0", "3", "6"]


def test_stacked_seeds_train_exactly_like_separate_models(tasks):
    """The vmap trick: S seeds trained as one stacked model = S separate trainings (dropout off, so that the
    random streams agree; with dropout each seed draws its own masks)."""
    cfg = dataclasses.replace(QUICK, dropout=0.0)
    small = {t: {s: (x[:600], y[:600]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    seeds = [0, 1, 2]
    together = ex.finetune(cfg, small, seeds, ex.pretrain(cfg, small, seeds)["params"], "lora_r4", 1e-2)
    alone = [ex.finetune(cfg, small, [s], ex.pretrain(cfg, small, [s])["params"], "lora_r4", 1e-2) for s in seeds]
    for i in range(len(seeds)):
        assert alone[i]["acc_B"][0] == pytest.approx(together["acc_B"][i], abs=1.5 / len(small["B"]["test"][1]))
    per_epoch_mean = [sum(a["losses"][e] for a in alone) / len(seeds) for e in range(cfg.finetune_epochs)]
    assert together["losses"] == pytest.approx(per_epoch_mean, rel=1e-4)


def test_stacked_parameters_match_separate_training_to_float_precision(tasks):
    cfg = dataclasses.replace(QUICK, dropout=0.0)
    small = {t: {s: (x[:512], y[:512]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    both = ex.pretrain(cfg, small, [3, 4])["params"]
    for i, s in enumerate([3, 4]):
        one = ex.pretrain(cfg, small, [s])["params"]
        for k in both:
            torch.testing.assert_close(both[k][i], one[k][0], rtol=1e-4, atol=1e-5)


def test_smoke_the_whole_pipeline_trains_and_writes_every_file(quick_run):
    out, grid, lrs, per_seed, results = quick_run
    assert set(lrs) == set(QUICK.methods) and all(lr in QUICK.lr_grid for lr in lrs.values())
    assert len(grid) == len(QUICK.methods) * len(QUICK.lr_grid)
    assert (per_seed.loss_last_epoch < per_seed.loss_first_epoch).all()
    assert (per_seed.acc_B > per_seed.acc_B_pretrained).all()  # finetuning on 5-9 helps on 5-9
    lora_rows = per_seed[per_seed.method != "full"]
    assert (lora_rows.acc_A_disabled == lora_rows.acc_A_pretrained).all()  # disable_lora is exact
    assert list(results.method) == QUICK.methods
    assert results.set_index("method").loc["lora_r8", "trainable_params"] == 1_045 * 8
    for name in ("results.csv", "results_per_seed.csv", "config.json", "parameters_vs_accuracy.png",
                 "lr_search.csv", "learning_rates.json"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".*.tmp"))
    saved = pd.read_csv(out / "results.csv")
    assert list(saved.columns) == ["method", "rank", "targets", "alpha", "trainable_params", "pct_params_vs_full", "acc_B_mean",
                                   "acc_B_std", "pct_acc_vs_full", "acc_A_after_mean", "seeds", "epochs",
                                   "batch_size", "lr"]
    config = json.loads((out / "config.json").read_text())
    assert config["config"] == json.loads(json.dumps(dataclasses.asdict(QUICK)))
    assert config["environment"]["torch"] == torch.__version__


def test_pretraining_loss_goes_down(tasks):
    cfg = dataclasses.replace(QUICK, pretrain_epochs=3)
    small = {t: {s: (x[:2000], y[:2000]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    losses = ex.pretrain(cfg, small, [0])["losses"]
    assert losses[-1] < losses[0] * 0.7


def test_a_rerun_is_identical_and_an_interrupted_sweep_resumes_to_the_same_result(quick_run, tmp_path):
    _, _, lrs, per_seed, _ = quick_run

    def interrupt_after_two(i):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ex.run_sweep(QUICK, lrs, CPU, cache_dir=tmp_path, progress=False, after_each=interrupt_after_two)
    cached = sorted(p.name for p in tmp_path.rglob("*.pt"))
    assert len(cached) == 3  # pretraining and two finished methods, nothing half-written
    (next(tmp_path.rglob("seeds_*")) / ".lora_r8_lr0.01.pt.123.tmp").write_bytes(b"torn")  # a killed write
    resumed = ex.run_sweep(QUICK, lrs, CPU, cache_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(resumed, per_seed)


def test_a_different_config_never_shares_cached_runs():
    keys = {ex.run_key(c, CPU) for c in (QUICK, dataclasses.replace(QUICK, finetune_epochs=3),
                                         dataclasses.replace(QUICK, lr_grid=(1e-3,)), ex.Config())}
    assert len(keys) == 4
    assert ex.run_key(QUICK, CPU) == ex.run_key(ex.Config.quick(), CPU)


def test_learning_rates_from_another_config_are_refused(quick_run):
    out = quick_run[0]
    assert ex.load_learning_rates(out, dataclasses.replace(QUICK, seeds=7))  # seeds do not change the tuning
    with pytest.raises(ValueError, match="finetune_epochs"):
        ex.load_learning_rates(out, dataclasses.replace(QUICK, finetune_epochs=9))
    with pytest.raises(FileNotFoundError, match="experiment.py tune"):
        ex.load_learning_rates(out / "nowhere", QUICK)


def test_summary_is_mean_and_std_over_seeds(quick_run):
    _, _, _, per_seed, results = quick_run
    row = results.set_index("method").loc["lora_r1"]
    accs = per_seed[per_seed.method == "lora_r1"].acc_B
    assert row.acc_B_mean == pytest.approx(accs.mean()) and row.acc_B_std == pytest.approx(accs.std())
    assert row.pct_params_vs_full == pytest.approx(100 * 1045 / 54725)
    assert results.set_index("method").loc["full", "pct_acc_vs_full"] == pytest.approx(100)


@pytest.mark.parametrize("args, message", [
    (["sweep", "--seeds", "0"], "seeds must be a positive int, got 0"),
    (["sweep", "--ranks", "4", "0"], "each rank must be a positive int, got 0"),
    (["sweep", "--ranks", "4", "4"], "ranks must be distinct"),
    (["sweep", "--device", "cuda:7"], "does not exist here"),
    (["sweep", "--device", "tpu"], "unknown device 'tpu'"),
    (["train"], "invalid choice: 'train'"),
])
def test_bad_cli_arguments_are_refused_before_any_work(args, message, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(ex, "tune", no_work)
    monkeypatch.setattr(ex, "run_sweep", no_work)
    with pytest.raises(SystemExit) as e:
        ex.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_sweep_cli_refuses_to_run_without_learning_rates(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ex.main(["sweep", "--quick", "--out", str(tmp_path)])
    assert "experiment.py tune" in capsys.readouterr().err


def test_finetuning_leaves_the_callers_warning_filters_alone(tasks):
    import warnings
    small = {t: {s: (x[:300], y[:300]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    base = ex.pretrain(QUICK, small, [0])["params"]
    before = list(warnings.filters)
    ex.finetune(QUICK, small, [0], base, "lora_r8", 1e-2)  # r = 8 > 5 on the head: silenced inside only
    assert warnings.filters == before

"""The MNIST experiments: the split, methods as data, the pipeline's files, the cache and resume, the CLI."""

import dataclasses
import json
import math
import warnings

import pandas as pd
import pytest
import torch

import lora
from experiments import protocol, storage
from experiments.__main__ import main as cli
from experiments.methods import Method
from experiments.mnist.config import Config
from experiments.mnist.experiment import MnistExperiment, finetune, initial_adapters, pretrain
from experiments.mnist.models import add_adapter, make_mlp
from experiments.mnist.tasks import load_tasks, split_indices

CPU = torch.device("cpu")
QUICK = Config.quick()


@pytest.fixture(scope="module")
def tasks():
    return load_tasks(Config(), CPU)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, run_pipeline):
    """tune + sweep + files on the quick config, once for the module."""
    out = storage.Outputs("mlp", tmp_path_factory.mktemp("quick"))
    return out, *run_pipeline(MnistExperiment(QUICK, CPU), out)


def test_train_and_validation_indices_are_disjoint_and_cover_the_training_images():
    train, val = split_indices(60_000, 5_000, split_seed=0, train_subset=None)
    assert len(val) == 5_000 and len(train) == 55_000
    assert not set(train.tolist()) & set(val.tolist())
    assert set(train.tolist()) | set(val.tolist()) == set(range(60_000))
    sub, val2 = split_indices(60_000, 5_000, split_seed=0, train_subset=6_000)
    assert torch.equal(val, val2) and torch.equal(sub, train[:6_000])  # quick mode keeps the same validation


def test_tasks_are_digits_0_4_and_5_9_relabelled_and_normalised(tasks):
    n = {t: {s: len(tasks[t][s][1]) for s in ("train", "val", "test")} for t in "AB"}
    assert n["A"]["test"] == 980 + 1135 + 1032 + 1010 + 982 and n["B"]["test"] == 892 + 958 + 1028 + 974 + 1009
    assert sum(n["A"][s] + n["B"][s] for s in ("train", "val")) == 60_000
    assert n["A"]["val"] + n["B"]["val"] == 5_000
    for t in "AB":
        for s in ("train", "val", "test"):
            x, y = tasks[t][s]
            assert x.shape == (len(y), 784) and x.dtype == torch.float32
            assert set(y.unique().tolist()) == {0, 1, 2, 3, 4}
    x = torch.cat([tasks["A"]["train"][0], tasks["B"]["train"][0]])
    assert x.mean().item() == pytest.approx(0, abs=0.02) and x.std().item() == pytest.approx(1, abs=0.02)


def test_the_model_is_the_reference_architecture():
    assert lora.count_parameters(make_mlp()) == (54_725, 54_725)
    assert lora.add_lora(make_mlp(), r=3) == ["0", "3", "6"]


def test_methods_are_data_with_names_and_distinct_dropout_streams():
    mlp, tf = Config().methods, Config.transformer().methods
    ranks = Config().ranks
    assert [m.name for m in mlp] == (["full"] + [f"lora_r{r}" for r in ranks] + [f"dora_r{r}" for r in ranks]
                                     + [f"qlora_r{r}" for r in Config().qlora_ranks])
    assert Config().qlora_ranks == (1, 8, 64) and all(m.nf4 for m in mlp[-3:])
    with pytest.raises(ValueError, match="DoRA over a 4-bit base"):
        Method("lora", 4, dora=True, nf4=True)
    with pytest.raises(ValueError, match="qlora_ranks must be some of ranks"):
        Config(qlora_ranks=(3,))
    assert [m.name for m in tf[:3]] == ["full", "lora_qv_r1", "lora_qv_r2"] and len(tf) == 1 + 3 * 4
    assert tf[-1] == Method("lora", 8, "all") and tf[-1].target_set == "all"
    with pytest.raises(ValueError, match="target_set must be one of"):
        Method("lora", 4, "q_v")
    streams = [m.dropout_seed for m in mlp + tf]
    assert len(set(streams)) == len({m for m in mlp + tf})  # distinct methods, distinct streams
    assert [m.dropout_seed for m in mlp[:1 + len(ranks)]] == [1000] + [1000 * (1 + r) for r in ranks]
    # Pinned: a method's dropout stream must not move when target sets or methods are added.
    assert [Method("head").dropout_seed, Method("lora", 8, "qv").dropout_seed, Method("lora", 8, "qkvo").dropout_seed,
            Method("lora", 4, dora=True).dropout_seed] == [500, 9100, 9200, 5050]
    with pytest.raises(ValueError, match="only a LoRA method has a rank, DoRA or a 4-bit base"):
        Method("full", dora=True)
    with pytest.raises(ValueError, match="needs a rank"):
        Method("lora")
    with pytest.raises(ValueError, match="kind must be one of"):
        Method("adapter", 4)


def test_the_csv_reads_alpha_from_the_layers(quick_run):
    _, _, _, per_seed, _ = quick_run
    lora_rows = per_seed[per_seed.method != "full"]
    assert (lora_rows.alpha == lora_rows["rank"]).all()  # alpha = r: what add_lora made, read back from the layers
    assert per_seed[per_seed.method == "full"].alpha.isna().all()


def test_stacked_seeds_train_exactly_like_separate_models(tasks):
    """S seeds trained as one stacked model = S separate trainings (dropout off, so that the random streams agree;
    with dropout each seed draws its own masks)."""
    cfg = dataclasses.replace(QUICK, dropout=0.0)
    small = {t: {s: (x[:600], y[:600]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    seeds, method = [0, 1, 2], Method("lora", 4, show_target_set=False)
    together = finetune(cfg, small, seeds, pretrain(cfg, small, seeds)["params"], method, (1e-2,))
    alone = [finetune(cfg, small, [s], pretrain(cfg, small, [s])["params"], method, (1e-2,)) for s in seeds]
    for i in range(len(seeds)):
        assert alone[i]["acc_B"][0] == pytest.approx(together["acc_B"][i], abs=1.5 / len(small["B"]["test"][1]))
        assert together["losses"][i] == pytest.approx(alone[i]["losses"][0], rel=1e-4)  # each seed's own loss
    assert together["losses"][0] != together["losses"][1]


def test_stacked_learning_rates_train_exactly_like_separate_runs(tasks):
    """The learning-rate search trains the whole grid at once: the same as one run per learning rate."""
    cfg = dataclasses.replace(QUICK, dropout=0.0)
    small = {t: {s: (x[:600], y[:600]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    seeds, method, lrs = [0, 1], Method("lora", 4, show_target_set=False), (1e-3, 1e-2, 3e-2)
    base = pretrain(cfg, small, seeds)["params"]
    together = finetune(cfg, small, seeds, base, method, lrs)
    assert together["lrs"] == [1e-3, 1e-3, 1e-2, 1e-2, 3e-2, 3e-2] and together["seeds"] == seeds * 3
    for i, lr in enumerate(lrs):
        alone = finetune(cfg, small, seeds, base, method, (lr,))
        for j in range(len(seeds)):
            k = i * len(seeds) + j
            assert together["losses"][k] == pytest.approx(alone["losses"][j], rel=1e-5)
            assert together["val_acc_B"][k] == pytest.approx(alone["val_acc_B"][j], abs=1.5 / len(small["B"]["val"][1]))
    assert len({tuple(ls) for ls in together["losses"]}) == len(together["losses"])  # all six runs differ


def test_smoke_the_whole_pipeline_trains_and_writes_every_file(quick_run):
    out, grid, lrs, per_seed, results = quick_run
    names = [m.name for m in QUICK.methods]
    assert set(lrs) == set(names) and all(lr in QUICK.lr_grid for lr in lrs.values())
    assert len(grid) == len(names) * len(QUICK.lr_grid)
    assert (per_seed.loss_last_epoch < per_seed.loss_first_epoch).all()
    chosen = per_seed[~per_seed.runner_up]  # a near tie's second rate is swept too, as a sensitivity row
    assert chosen.groupby("method").loss_last_epoch.nunique().eq(QUICK.seeds).all()  # each seed's own loss
    assert (per_seed.acc_B > per_seed.acc_B_pretrained).all()  # finetuning on 5-9 helps on 5-9
    lora_rows = per_seed[(per_seed.method != "full") & ~per_seed.nf4]
    assert (lora_rows.acc_A_disabled == lora_rows.acc_A_pretrained).all()  # disable_lora is exact
    qlora = per_seed[per_seed.nf4]  # switched off, QLoRA gives the 4-bit base back, not the float32 one
    assert len(qlora) and (qlora.acc_A_disabled != qlora.acc_A_pretrained).any()
    assert list(results.method) == names
    assert results.set_index("method").loc["lora_r4", "trainable_params"] == 1_045 * 4
    assert results.set_index("method").loc["dora_r4", "trainable_params"] == 1_045 * 4 + 64 + 64 + 5  # + magnitudes
    for path in out.all():
        assert path.stat().st_size > 0, path
    assert out.summary == out.root / "results.csv" and out.per_seed == out.root / "results" / "mlp_per_seed.csv"
    assert not list(out.root.rglob(".*.tmp"))
    saved = pd.read_csv(out.summary)
    family = lambda a: [f"diff_{a}", f"diff_{a}_low", f"diff_{a}_high", f"p_{a}", f"p_match_{a}", f"floor_{a}",
                        f"verdict_{a}", f"rate_sensitive_{a}"]
    assert list(saved.columns) == ["method", "rank", "targets", "dora", "nf4", "alpha", "trainable_params",
                                   "pct_params_vs_full", "acc_B_mean", "acc_B_std", "pct_acc_vs_full",
                                   *family("vs_full"), *family("vs_lora"), "acc_A_after_mean", "acc_A_pretrained_mean",
                                   "diverged_mean", "seeds", "epochs", "batch_size", "lr", "lr_runner_up"]
    config = json.loads(out.config.read_text())
    assert config["config"] == json.loads(json.dumps(dataclasses.asdict(QUICK)))
    assert config["environment"]["torch"] == torch.__version__


def test_pretraining_loss_goes_down(tasks):
    cfg = dataclasses.replace(QUICK, pretrain_epochs=3)
    small = {t: {s: (x[:2000], y[:2000]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    (losses,) = pretrain(cfg, small, [0])["losses"]
    assert losses[-1] < losses[0] * 0.7


def interrupt_after(n: int):
    """An after_each callback that raises KeyboardInterrupt once n jobs have finished, in whatever order."""
    finished = []

    def callback(i: int) -> None:
        finished.append(i)
        if len(finished) == n:
            raise KeyboardInterrupt
    return callback


def test_a_rerun_is_identical_and_an_interrupted_sweep_resumes_to_the_same_result(quick_run, tmp_path):
    _, _, lrs, per_seed, _ = quick_run

    interrupt_after_two = interrupt_after(2)
    with pytest.raises(KeyboardInterrupt):
        protocol.sweep(MnistExperiment(QUICK, CPU), lrs, tmp_path, progress=False, after_each=interrupt_after_two,
                       workers=1)
    cached = sorted(p.name for p in tmp_path.rglob("*.pt"))
    assert len(cached) == 3  # pretraining and two finished methods, nothing half-written
    (next(tmp_path.rglob("seeds_*")) / ".lora_r4_lr0.01.pt.123.tmp").write_bytes(b"torn")  # a killed write
    resumed = protocol.sweep(MnistExperiment(QUICK, CPU), lrs, tmp_path, progress=False, workers=1)
    pd.testing.assert_frame_equal(resumed, per_seed)


def test_jobs_in_two_processes_give_the_bits_of_one_process_and_resume_after_an_interrupt(quick_run, tmp_path):
    _, _, lrs, per_seed, _ = quick_run  # run with the default workers: one per core of this machine
    alone = protocol.sweep(MnistExperiment(QUICK, CPU), lrs, tmp_path / "alone", progress=False, workers=1)
    pd.testing.assert_frame_equal(alone, per_seed)  # one thread per job: the same bits however many run at once
    interrupt_after_two = interrupt_after(2)
    with pytest.raises(KeyboardInterrupt):
        protocol.sweep(MnistExperiment(QUICK, CPU), lrs, tmp_path / "two", progress=False,
                       after_each=interrupt_after_two, workers=2)
    jobs = sorted(p.name for p in (tmp_path / "two").rglob("*_lr*.pt"))
    assert len(jobs) >= 2  # the two that finished, and any that had started: those finish before the raise
    assert not list((tmp_path / "two").rglob("*.tmp"))  # so none is still writing
    resumed = protocol.sweep(MnistExperiment(QUICK, CPU), lrs, tmp_path / "two", progress=False, workers=2)
    pd.testing.assert_frame_equal(resumed, per_seed)


def test_lora_workers_must_be_a_positive_integer(monkeypatch):
    from experiments.parallel import default_workers
    monkeypatch.setenv("LORA_WORKERS", "3")
    assert default_workers() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("LORA_WORKERS", bad)
        with pytest.raises(ValueError, match=f"LORA_WORKERS must be a positive integer, got '{bad}'"):
            default_workers()


def test_a_different_config_never_shares_cached_runs():
    key = lambda c: protocol.run_key(MnistExperiment(c, CPU))
    keys = {key(c) for c in (QUICK, dataclasses.replace(QUICK, finetune_epochs=3),
                             dataclasses.replace(QUICK, lr_grid=(1e-3,)), Config())}
    assert len(keys) == 4
    assert key(QUICK) == key(Config.quick())


def test_the_cache_key_hashes_training_code_and_not_reporting_code(monkeypatch, tmp_path):
    exp = MnistExperiment(QUICK, CPU)
    names = [f.name for f in exp.code_files()]
    assert {"lora.py", "trainer.py", "methods.py", "models.py"} <= set(names)
    assert not {"lora_peft.py", "report.py", "figures.py", "storage.py", "__main__.py"} & set(names)
    copies = [tmp_path / f"{i}_{f.name}" for i, f in enumerate(exp.code_files())]
    for copy, f in zip(copies, exp.code_files()):
        copy.write_bytes(f.read_bytes())
    key = protocol.run_key(exp)
    monkeypatch.setattr(exp, "code_files", lambda: copies)
    assert protocol.run_key(exp) == key  # the same bytes, wherever they are
    copies[names.index("trainer.py")].write_text("# a changed training loop\n")
    assert protocol.run_key(exp) != key


@pytest.mark.parametrize("name", ["mlp", "transformer", "text"])
def test_editing_reporting_or_the_margin_leaves_every_cache_key_unchanged(name):
    """Running apart from reporting: no file that summarizes, words, draws, compares or chooses is hashed into
    the run cache's key, nor the verdicts' margin; a report edit never throws a trained run away."""
    from experiments.__main__ import make_experiment
    exp = make_experiment(name, CPU)
    reporting = {"report.py", "sentences.py", "figures.py", "stats.py", "compare.py", "run.py", "protocol.py",
                 "table.py", "storage.py", "__main__.py"}  # mnist/report.py is a report.py too
    assert not reporting & {f.name for f in exp.code_files()}
    key = protocol.run_key(exp)
    exp.cfg = dataclasses.replace(exp.cfg, margin=exp.cfg.margin * 2)
    assert protocol.run_key(exp) == key


def test_learning_rates_from_another_config_are_refused(quick_run):
    out = quick_run[0]
    load = lambda o, c: storage.load_learning_rates(o, protocol.tuning_fields(c),
                                                    MnistExperiment(c, CPU).tune_command())
    assert load(out, dataclasses.replace(QUICK, seeds=7))  # seeds do not change the tuning
    with pytest.raises(ValueError, match="finetune_epochs"):
        load(out, dataclasses.replace(QUICK, finetune_epochs=9))
    with pytest.raises(FileNotFoundError, match="python -m experiments tune --experiment mlp"):
        load(storage.Outputs("mlp", out.root / "nowhere"), QUICK)


def test_summary_is_mean_and_std_over_seeds_with_paired_differences(quick_run):
    _, _, _, per_seed, results = quick_run
    row = results.set_index("method").loc["lora_r1"]
    accs = per_seed[per_seed.method == "lora_r1"].acc_B
    assert row.acc_B_mean == pytest.approx(accs.mean()) and row.acc_B_std == pytest.approx(accs.std())
    wide = per_seed.pivot(index="seed", columns="method", values="acc_B")
    assert row.diff_vs_full == pytest.approx((wide["lora_r1"] - wide["full"]).mean())
    dora = results.set_index("method").loc["dora_r1"]
    assert dora.diff_vs_lora == pytest.approx((wide["dora_r1"] - wide["lora_r1"]).mean())
    assert dora.diff_vs_lora_low <= dora.diff_vs_lora <= dora.diff_vs_lora_high
    assert pd.isna(row.diff_vs_lora)  # LoRA rows have no DoRA twin to compare with
    assert row.pct_params_vs_full == pytest.approx(100 * 1045 / 54725)
    assert results.set_index("method").loc["full", "pct_acc_vs_full"] == pytest.approx(100)


@pytest.mark.parametrize("args, message", [
    (["sweep", "--seeds", "0"], "seeds must be a positive int, got 0"),
    (["sweep", "--ranks", "4", "0"], "each rank must be a positive int, got 0"),
    (["sweep", "--ranks", "4", "4"], "ranks must be distinct"),
    (["sweep", "--device", "cuda:7"], "does not exist here"),
    (["sweep", "--device", "tpu"], "unknown device 'tpu'"),
    (["train"], "invalid choice: 'train'"),
    (["tune", "--experiment", "cifar"], "invalid choice: 'cifar'"),
])
def test_bad_cli_arguments_are_refused_before_any_work(args, message, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("work started")
    monkeypatch.setattr(protocol, "tune", no_work)
    monkeypatch.setattr(protocol, "sweep", no_work)
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_sweep_cli_refuses_to_run_without_learning_rates(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["sweep", "--quick", "--out", str(tmp_path)])
    assert "python -m experiments tune --experiment mlp" in capsys.readouterr().err


def test_finetuning_leaves_the_callers_warning_filters_alone(tasks):
    small = {t: {s: (x[:300], y[:300]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    base = pretrain(QUICK, small, [0])["params"]
    before = list(warnings.filters)
    finetune(QUICK, small, [0], base, Method("lora", 8, show_target_set=False), (1e-2,))  # r = 8 > 5 on the head
    assert warnings.filters == before


def test_doras_magnitude_starts_at_the_row_norms_of_each_seeds_pretrained_weights(tasks):
    small = {t: {s: (x[:300], y[:300]) for s, (x, y) in tasks[t].items()} for t in "AB"}
    base = pretrain(QUICK, small, [0, 1])["params"]
    adapters = initial_adapters(QUICK, Method("lora", 2, dora=True), [0, 1], base)
    for i in range(2):
        for layer in ("0", "3", "6"):
            torch.testing.assert_close(adapters[f"{layer}.lora_magnitude"][i], base[f"{layer}.weight"][i].norm(dim=1))
    assert not torch.equal(adapters["0.lora_magnitude"][0], adapters["0.lora_magnitude"][1])  # each seed its own


def test_add_adapter_trains_only_the_adapters_on_the_mlp():
    model = make_mlp()
    add_adapter(model, Method("lora", 2))
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_the_rule_takes_the_best_total_count_and_sweeps_a_runner_up_within_the_paired_noise():
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    ok = [""] * 4
    # best 1e-2 (303); 3e-3 two behind with per-seed differences (0, 1, 1): mean 0.67 > SE 0.33: no near tie
    c = protocol.choose(lrs, [[90, 90, 90], [100, 100, 101], [100, 101, 102], [99, 99, 100]], ok)
    assert (c.lr, c.runner_up, c.extend) == (1e-2, None, 0)
    # differences (0, 0, 1) to 3e-3: mean 0.33 <= SE 0.33: a near tie, swept too; the best is still chosen
    c = protocol.choose(lrs, [[90, 90, 90], [100, 101, 101], [100, 101, 102], [99, 99, 100]], ok)
    assert (c.lr, c.runner_up) == (1e-2, 3e-3)
    # an exact tie goes to the smaller rate, and the other is the runner-up (difference 0, SE 0)
    c = protocol.choose(lrs, [[90, 90, 90], [101, 101, 101], [101, 101, 101], [99, 99, 100]], ok)
    assert (c.lr, c.runner_up) == (3e-3, 1e-2)
    # noisy seeds: a lead of 2 counts a seed with differences (+12, -8, +2) is within its SE (5.8): a near tie
    c = protocol.choose(lrs, [[90] * 3, [88, 108, 98], [100, 100, 100], [80] * 3], ok)
    assert (c.lr, c.runner_up) == (1e-2, 3e-3)


@pytest.mark.parametrize("accuracy, first, last, word", [
    ([0.9, 0.91, 0.9], [1.0] * 3, [0.2] * 3, ""),
    ([0.9, 0.91, 0.9], [1.0] * 3, [0.2, float("nan"), 0.2], "diverged"),   # not finite
    ([0.9, 0.91, 0.9], [1.0] * 3, [0.2, 1.3, 0.2], "diverged"),           # ended above where it started
    ([0.89, 0.40, 0.51], [1.0] * 3, [0.5] * 3, "diverged"),               # seeds disagree (transformer, issue 32)
    ([0.25, 0.22, 0.26], [1.6] * 3, [1.55] * 3, "too slow"),              # still near chance (0.2): < 0.28
    ([0.30, 0.31, 0.29], [1.6] * 3, [1.5] * 3, ""),                       # slow, but learning
])
def test_a_rate_is_flagged_diverged_or_too_slow_from_its_tuning_seeds(accuracy, first, last, word):
    assert protocol.flag(accuracy, first, last, classes=5) == word


def test_two_class_runs_above_chance_are_not_called_diverged_for_their_loss():
    """On two-class text a run at validation 0.68-0.73 has a training loss near 0.9 ln 2; the old rule called it
    diverged. It is learning: eligible (and simply loses on its count, if it does)."""
    assert protocol.flag([0.68, 0.73, 0.70], [0.69] * 3, [0.62] * 3, classes=2) == ""


def test_flagged_rates_are_out_and_say_which_way_the_grid_should_grow():
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    correct = [[90, 90, 90], [95, 95, 95], [99, 99, 99], [120, 120, 30]]  # 3e-2 scores best on two seeds
    c = protocol.choose(lrs, correct, ["", "", "", "diverged"])
    assert (c.lr, c.extend) == (1e-2, 0) and c.out == {3e-2: "diverged"}  # the best eligible rate is inside
    assert protocol.choose(lrs, correct, ["diverged"] * 4).extend == -1   # every rate diverged: look lower
    assert protocol.choose(lrs, correct, ["too slow"] * 4).extend == 1    # every rate too slow: look higher
    mixed = protocol.choose(lrs, correct, ["too slow", "too slow", "diverged", "diverged"])
    assert mixed.lr is None and mixed.extend == 0   # nothing between them to grow into: the warning says so


def test_a_chosen_rate_at_an_end_of_the_grid_asks_to_grow_it_that_way():
    ok = [""] * 3
    assert protocol.choose([1e-3, 1e-2, 1e-1], [[1, 1], [2, 2], [3, 3]], ok).extend == 1
    assert protocol.choose([1e-3, 1e-2, 1e-1], [[3, 3], [2, 2], [1, 1]], ok).extend == -1
    assert protocol.beyond([1e-3, 3e-3, 1e-2, 3e-2], 1) == 0.1 and protocol.beyond([1e-3, 3e-3, 1e-2, 3e-2], -1) == 3e-4
    assert protocol.beyond([3e-3, 1e-2, 3e-2, 1e-1], 1) == 0.3  # not 0.30000000000000004
    assert protocol.beyond([0.1, 0.2, 0.4], 1) == 0.8 and protocol.beyond([0.1, 0.2, 0.4], -1) == 0.05
    with pytest.raises(ValueError, match="distinct and ascending"):
        protocol.choose([1e-2, 1e-3], [[1], [1]], ["", ""])
    with pytest.raises(ValueError, match="one count list and one flag"):
        protocol.choose([1e-3, 1e-2], [[1], [1]], ["", "exploded"])


class PeakAt(protocol.Experiment):
    """A made-up experiment: validation counts peak at a given rate per method, and rates above `blows_up`
    diverge. Training is a formula, so the protocol's own steps are what the test sees."""
    name, metric, val_metric, classes = "peak", "acc", "val_acc", 5
    per_seed_columns = ("method", "seed", "lr")

    def __init__(self, cfg, peaks: dict[str, float], blows_up: float = math.inf):
        super().__init__(cfg, torch.device("cpu"))
        self.peaks, self.blows_up, self.trained = peaks, blows_up, []

    def code_files(self):
        return []

    def key_extra(self):
        return [self.peaks, self.blows_up]

    def train(self, shared, method, lrs, seeds):
        self.trained.append((method.name, lrs))
        return [{"method": method.name, "lr": lr, "seed": s, "val_acc": 0.9,
                 "val_correct": 1000 - round(100 * abs(math.log10(lr / self.peaks[method.name]))) + 3 * (s % 2),
                 "loss_first_epoch": 1.0, "loss_last_epoch": 9.0 if lr > self.blows_up else 0.1}
                for lr in lrs for s in seeds]

    def summarize(self, per_seed): ...
    def plot(self, results): ...
    def readme_block(self, results, config): ...


def test_tuning_grows_the_grid_where_the_best_rate_is_at_an_end_and_warns_only_at_the_bound(tmp_path):
    cfg = dataclasses.replace(Config.quick(), lr_grid=(1e-3, 3e-3, 1e-2), ranks=(1,), dora=False, tune_seeds=3,
                              qlora_ranks=())
    exp = PeakAt(cfg, {"full": 0.03, "lora_r1": 1.0})  # full: one step past the top; LoRA: far past it
    with pytest.warns(UserWarning, match="still wants to grow after 2 steps") as caught:
        grid, chosen, runner_up = protocol.tune(exp, tmp_path, progress=False)
    assert "lora_r1" in str(caught[0].message) and "'full'" not in str(caught[0].message)
    full = grid[grid.method == "full"]
    assert full.lr.tolist() == [1e-3, 3e-3, 1e-2, 3e-2, 0.1] and chosen["full"] == 3e-2
    assert full.grown.tolist() == [False, False, False, True, True]
    assert full.set_index("lr").loc[3e-2, "rule"] == "chosen" and runner_up == {}
    assert grid[grid.method == "lora_r1"].lr.max() == 0.1 and chosen["lora_r1"] == 0.1  # the bound: 2 steps up
    assert protocol.stuck_at_grid_end(grid) == ["lora_r1"]
    # the whole grid once per method, then one job per new rate: nothing trains twice
    assert sorted(exp.trained) == sorted([("full", cfg.lr_grid), ("lora_r1", cfg.lr_grid), ("full", (3e-2,)),
                                          ("lora_r1", (3e-2,)), ("full", (0.1,)), ("lora_r1", (0.1,))])


def test_growing_stops_where_the_next_rate_diverges(tmp_path):
    cfg = dataclasses.replace(Config.quick(), lr_grid=(1e-3, 3e-3, 1e-2), ranks=(1,), dora=False, tune_seeds=3,
                              qlora_ranks=())
    exp = PeakAt(cfg, {"full": 1.0, "lora_r1": 1.0}, blows_up=0.02)
    with warnings.catch_warnings(record=True) as caught:  # 3e-2, the next rate, diverges: 1e-2 is inside now
        warnings.simplefilter("always")
        grid, chosen, _ = protocol.tune(exp, tmp_path, progress=False)
    assert not [w for w in caught if "wants to grow" in str(w.message)]
    assert chosen == {"full": 1e-2, "lora_r1": 1e-2}
    rows = grid[grid.method == "full"].set_index("lr")
    assert rows.index.tolist() == [1e-3, 3e-3, 1e-2, 3e-2]  # grown once, then stopped
    assert rows.loc[3e-2, "flag"] == "diverged" and rows.loc[3e-2, "rule"] == "diverged"
    assert rows.loc[1e-2, "rule"] == "chosen"


def test_qlora_trains_over_the_nf4_round_trip_of_the_hidden_layers_and_keeps_the_head():
    """four_bit: each seed's hidden weights as LinearNF4 computes with them (nf4.quantize_model, then dequantized),
    the 5-way head untouched; the stacked MLP's forward over them is the quantized model's own output."""
    import nf4
    from experiments.mnist import stacked_mlp
    from experiments.mnist.experiment import four_bit
    from experiments.trainer import stack
    models = []
    for s in (0, 1):
        torch.manual_seed(s)
        models.append(make_mlp(dropout=0.0))
    base = stack([m.state_dict() for m in models])
    q = four_bit(dataclasses.replace(QUICK, dropout=0.0), base)
    assert torch.equal(q["6.weight"], base["6.weight"]) and torch.equal(q["0.bias"], base["0.bias"])
    assert not torch.equal(q["0.weight"], base["0.weight"]) and not torch.equal(q["3.weight"], base["3.weight"])
    x = torch.randn(2, 7, 784)
    got = stacked_mlp.forward({}, q, x, 1.0, 0.0, training=False)  # (S, B, 5)
    for i, m in enumerate(models):
        kept = nf4.quantize_model(m, targets=["0", "3"])
        assert kept == ["0", "3"] and isinstance(m[6], torch.nn.Linear)
        torch.testing.assert_close(got[i], m.eval()(x[i]), rtol=0, atol=1e-6)


def test_reporting_again_rereads_the_saved_runs_and_refuses_another_configs(quick_run):
    """python -m experiments report: the summary recomputed from the saved per-seed records is the saved one; runs
    made with another config are refused (the summary states the config's budget)."""
    from experiments import run as driver
    out = quick_run[0]
    saved = out.summary.read_bytes()
    driver.report_again(MnistExperiment(QUICK, CPU), out)
    assert out.summary.read_bytes() == saved
    with pytest.raises(ValueError, match="another config .*finetune_epochs"):
        driver.report_again(MnistExperiment(dataclasses.replace(QUICK, finetune_epochs=9), CPU), out)
    driver.report_again(MnistExperiment(dataclasses.replace(QUICK, margin=0.02), CPU), out)  # reporting only: allowed
    driver.report_again(MnistExperiment(QUICK, CPU), out)  # the fixture's files as they were, for other tests
    assert out.summary.read_bytes() == saved

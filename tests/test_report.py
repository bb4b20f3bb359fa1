"""Reporting: paired statistics, intervals and verdicts, and the figures, each rendered from the committed results
with its two panels and error bars that say what they are."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from matplotlib.figure import Figure

import torch

from experiments import figures, report, stats, storage
from experiments.mnist.config import Config
from experiments.mnist.experiment import MnistExperiment
from experiments.text.config import TextConfig
from experiments.text.experiment import TextExperiment

CPU = torch.device("cpu")


def committed_figure(experiment: str) -> Figure:
    out = storage.Outputs(experiment)
    results = storage.load_results(out)
    if experiment.startswith("text_"):
        return TextExperiment(TextConfig.default(experiment.removeprefix("text_")), CPU).plot(results)
    return MnistExperiment(Config.default(experiment), CPU).plot(results)


@pytest.mark.parametrize("experiment", ["mlp", "transformer", "text_rotten_tomatoes"])
def test_each_figure_renders_from_the_committed_results_with_accuracy_and_difference_panels(experiment):
    fig = committed_figure(experiment)
    accuracy, difference = fig.axes
    legend = " ".join(t.get_text() for t in accuracy.get_legend().get_texts())
    assert "± std over" in legend
    assert "95% interval" in difference.get_title()  # simultaneous, or the text tables' older per-row ones
    rows = len(storage.load_results(storage.Outputs(experiment))) - 1  # every method but full finetuning
    assert len(difference.get_yticks()) == rows


def test_the_reference_full_finetune_is_marked_as_the_bug_it_is():
    legend = [t.get_text() for t in committed_figure("mlp").axes[0].get_legend().get_texts()]
    assert any("bug" in t and "0-4" in t for t in legend)
    assert not any("150" in t for t in legend)


def test_points_of_different_series_that_share_a_count_are_drawn_side_by_side_and_others_stay():
    xs = figures.side_by_side([[1000, 2000], [2000, 8000], [4000]], step=1.1)
    assert xs == [[1000, pytest.approx(2000 / 1.1 ** 0.5)], [pytest.approx(2000 * 1.1 ** 0.5), 8000], [4000]]


def test_an_interval_reads_in_points_and_is_blank_where_there_is_none():
    assert report.interval(-0.0123, -0.02, -0.0046) == "-1.23 (-2.00 to -0.46)"
    assert report.interval(0.0, 0.0, 0.0) == "" and report.interval(0.01, float("nan"), float("nan")) == ""


@pytest.mark.parametrize("p, p_match, mean, word", [
    (0.001, 0.001, -0.004, "below, within ±0.5"),     # below zero, inside the margin
    (0.001, 0.9, -0.02, "below"),                     # below zero, reaching past the margin
    (0.001, 0.9, 0.02, "above"),
    (0.9, 0.001, 0.001, "within ±0.5"),               # holds zero, inside the margin
    (0.9, 0.9, -0.01, "not distinguishable"),
    (0.04, 0.9, -0.02, "below (borderline)"),         # p within a factor of 3 of 0.05, either side
    (0.9, 0.12, -0.001, "not distinguishable (borderline)"),
    (0.001, 0.0167, -0.004, "below, within ±0.5 (borderline)"),
    (0.001, 0.0166, -0.004, "below, within ±0.5"),    # just under 0.05 / 3: decided
    (math.nan, 0.0, 0.0, ""),
])
def test_the_four_verdicts_and_borderline_on_constructed_adjusted_p_values(p, p_match, mean, word):
    assert stats.verdict(p, p_match, mean, margin=0.005) == word


def test_a_family_prints_the_simultaneous_interval_its_verdict_is_read_off():
    """Bonferroni over m = 4: each interval at 1 - 0.05 / 4, each p-value times 4; a verdict agrees with its own
    printed interval (zero excluded, inside ±M), whatever the row."""
    rows = pd.DataFrame({"diff_mean": [-0.03, -0.003, 0.0005, -0.006], "se": [0.004, 0.0005, 0.0008, 0.004],
                         "df": [4.0, 30.0, 9.0, 4.0], "floor_se": [0.001, 0.0005, 0.0, math.nan]})
    got = stats.family(rows, margin=0.005)
    t = scipy.stats.t(4)
    assert got.loc[0, "diff_low"] == pytest.approx(-0.03 - t.ppf(1 - 0.05 / 8) * 0.004)
    assert got.loc[0, "p"] == pytest.approx(min(1, 4 * 2 * t.sf(0.03 / 0.004)))
    assert got.loc[1, "p_match"] == pytest.approx(4 * 2 * scipy.stats.t(30).sf(0.002 / 0.0005))
    assert got.loc[1, "floor"] == pytest.approx(scipy.stats.norm.ppf(1 - 0.05 / 8) * 0.0005)
    assert got["verdict"].str.removesuffix(" (borderline)").tolist() == [
        "below", "below, within ±0.5", "within ±0.5", "not distinguishable"]
    for _, r in got.iterrows():
        below, inside = r.diff_high < 0, -0.005 < r.diff_low and r.diff_high < 0.005
        assert (r.p < 0.05) == (below or r.diff_low > 0) and (r.p_match < 0.05) == inside
    # the same row in a larger family: a wider interval, never a stronger verdict
    wider = stats.family(rows.iloc[[1]], margin=0.005, m=40)
    assert wider.loc[1, "diff_low"] < got.loc[1, "diff_low"] and wider.loc[1, "p"] == pytest.approx(min(1, 10 * got.loc[1, "p"]))


def test_the_difference_adds_the_test_sets_noise_to_the_seeds_by_the_two_way_analysis_of_variance():
    """A known case by hand: D = [[1, 0, 0], [1, 1, 0]] (2 seeds, 3 examples). Mean squares: seeds 1/6, examples
    1/2, residual 1/6; the grand mean's variance (1/6 + 1/2 - 1/6) / 6 = 1/12, with Satterthwaite's
    (1/2)^2 / ((1/6)^2 / 1 + (1/2)^2 / 2 + (1/6)^2 / 2) = 1.5 degrees of freedom; the test set's floor, what
    would remain with infinitely many seeds, (1/2 - 1/6) / 6 = 1/18."""
    D = np.array([[1, 0, 0], [1, 1, 0]])
    assert stats.crossed_variance(D) == pytest.approx((1 / 12, 1.5, 1 / 18))
    got = stats.difference(D.mean(1), D)
    assert got["diff_mean"] == pytest.approx(0.5) and got["df"] == pytest.approx(1.5)
    assert got["se"] == pytest.approx(math.sqrt(1 / 12)) and got["floor_se"] == pytest.approx(math.sqrt(1 / 18))
    # no example effect (every example alike): the seeds' term alone, Student's t with S - 1 degrees of freedom
    alike = np.repeat(np.array([[0.01], [0.02], [0.03]]), 100, axis=1)
    assert stats.crossed_variance(alike) == pytest.approx((np.var([0.01, 0.02, 0.03], ddof=1) / 3, 2, 0))


def test_the_interval_covers_the_true_difference_95_percent_of_the_time():
    """Simulated: 5 seeds, 500 test examples each right with its own probability (the test set is a sample), each
    seed's training luck shifting the other method's; true mean difference 0. Not too narrow, not too wide."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        p_example = rng.uniform(0.6, 0.99, 500)
        base = rng.random((5, 500)) < p_example
        shift = rng.normal(0.0, 0.01, (5, 1))
        other = rng.random((5, 500)) < np.clip(p_example + shift, 0, 1)
        items = other.astype(np.int8) - base
        got = stats.family(pd.DataFrame([stats.difference(items.mean(1), items)]), margin=0.01)  # m = 1: 95%
        covered += got.loc[0, "diff_low"] <= 0 <= got.loc[0, "diff_high"]
    assert 0.92 <= covered / 400 <= 0.98  # 0.95 measured


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
    assert d.loc["lora", "se"] == pytest.approx(0, abs=1e-12)  # the same +0.02 each seed
    with pytest.raises(ValueError, match="baseline 'nothing'"):
        stats.paired_differences(per_seed, "acc", baseline="nothing")


def test_compare_says_byte_identical_for_the_same_files_and_names_what_moved_otherwise(tmp_path):
    """The re-run report (python -m experiments compare): the committed MLP files against themselves, then against
    a copy with one rate, one verdict in each column and one mean changed."""
    from experiments import compare
    committed = storage.Outputs("mlp")
    text, table = compare.compare(committed, committed)
    assert "byte-identical" in text and table.empty
    other = storage.Outputs("mlp", tmp_path)
    other.test_correct.parent.mkdir(parents=True)
    other.test_correct.write_bytes(committed.test_correct.read_bytes())
    results = storage.load_results(committed)
    n = len(results)
    i = results.index[results.method == "lora_r8"][0]
    j = results.index[results.method == "dora_r8"][0]
    results.loc[i, "lr"] = 0.5
    results.loc[i, "verdict_vs_full"] = "above"
    results.loc[j, "verdict_vs_lora"] = "above"
    results.loc[i, "acc_B_mean"] += 3 * results.loc[i, "acc_B_std"]
    results.to_csv(other.summary, index=False)
    text, table = compare.compare(other, committed)
    now = storage.load_results(committed).set_index("method")
    assert f"not byte-identical; {n - 1} of {n} learning rates the same" in text
    assert f"LoRA r=8 0.5 → {now.loc['lora_r8', 'lr']:g}" in text
    assert f"LoRA r=8 against full finetuning: above → {report.cell_word(now.loc['lora_r8', 'verdict_vs_full'], now.loc['lora_r8', 'rate_sensitive_vs_full'])}" in text
    assert "DoRA r=8 against LoRA: above → " in text  # the second column is compared too
    assert "More than two seed standard deviations apart: LoRA r=8." in text
    assert len(table) == n and "| LoRA r=8 |" in compare.markdown(table)


@pytest.mark.parametrize("before, now, agree", [
    ("below", "below", True), ("below (borderline)", "below", True),
    ("below", "not distinguishable", False),
    ("below (borderline)", "not distinguishable (borderline)", True),      # borderline on both sides
    ("below; rate-sensitive", "within ±0.5 (borderline)", True),
    ("below (borderline)", "within ±0.5", False),                         # marked on one side only
])
def test_two_runs_agree_on_a_verdict_with_the_same_words_or_marked_at_the_margin_in_both(before, now, agree):
    from experiments import compare
    assert compare.agree(before, now) is agree


def test_compare_against_a_git_revision_reads_the_committed_files(capsys):
    from experiments.__main__ import main as cli
    cli(["compare", "--experiment", "mlp", "--against", "HEAD"])
    out = capsys.readouterr().out
    assert out.startswith("mlp: ")  # byte-identical where the working tree's results are HEAD's, else what moved
    with pytest.raises(SystemExit):
        cli(["compare", "--experiment", "mlp", "--against", "no-such-revision"])


def test_a_verdict_that_differs_at_the_runner_up_rate_is_marked_rate_sensitive():
    """report.summarize with the runs of a runner-up rate: they never enter the table's numbers, only the mark, and
    report.runner_up_rows gives the method's row at that rate."""
    from experiments.methods import Method
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(6):
        for method, lr, acc, runner in (("full", 0.01, 0.98, False), ("lora_r4", 0.01, 0.978, False),
                                        ("lora_r4", 0.03, 0.90, True), ("lora_r8", 0.01, 0.90, False),
                                        ("lora_r8", 0.003, 0.901, True)):
            rows.append({"method": method, "rank": None if method == "full" else int(method[6:]),
                         "targets": None if method == "full" else "all", "dora": False, "alpha": 1,
                         "trainable_params": 100, "seed": seed, "lr": lr, "runner_up": runner,
                         "acc": acc + rng.normal(0, 0.0005)})
    per_seed = pd.DataFrame(rows)
    methods = [Method("full"), Method("lora", 4, show_target_set=False), Method("lora", 8, show_target_set=False)]
    summarize = lambda p: report.summarize(p, methods, "acc", margin=0.005)
    results = summarize(per_seed).set_index("method")
    assert results.loc["lora_r4", "acc_mean"] == pytest.approx(per_seed.query("method == 'lora_r4' and not runner_up").acc.mean())
    assert "within ±0.5" in results.loc["lora_r4", "verdict_vs_full"]
    assert results.loc["lora_r4", "rate_sensitive_vs_full"] and results.loc["lora_r4", "lr_runner_up"] == 0.03
    assert results.loc["lora_r8", "verdict_vs_full"] == "below" and not results.loc["lora_r8", "rate_sensitive_vs_full"]
    alt = report.runner_up_rows(per_seed, summarize).set_index("method")
    assert list(alt.index) == ["lora_r4", "lora_r8"] and alt.loc["lora_r4", "lr"] == 0.03
    assert alt.loc["lora_r4", "verdict_vs_full"] == "below"
    assert "LoRA r=4 (runner-up rate)" in report.table(results.reset_index(), False, runner_up=alt.reset_index())["method"].tolist()

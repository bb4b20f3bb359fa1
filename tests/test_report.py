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
    assert "95% interval" in difference.get_title()
    rows = len(storage.load_results(storage.Outputs(experiment))) - 1  # every method but full finetuning
    assert len(difference.get_yticks()) == rows


def test_the_reference_full_finetune_is_marked_as_the_bug_it_is():
    legend = [t.get_text() for t in committed_figure("mlp").axes[0].get_legend().get_texts()]
    assert any("bug" in t and "0-4" in t for t in legend)
    assert not any("150" in t for t in legend)


def test_points_of_different_series_that_share_a_count_are_drawn_side_by_side_and_others_stay():
    xs = figures.side_by_side([[1000, 2000], [2000, 8000], [4000]], step=1.1)
    assert xs == [[1000, pytest.approx(2000 / 1.1 ** 0.5)], [pytest.approx(2000 * 1.1 ** 0.5), 8000], [4000]]


def test_an_interval_and_a_verdict_read_off_the_paired_difference():
    assert report.interval(-0.0123, -0.02, -0.0046) == "-1.23 (-2.00 to -0.46)"
    assert report.interval(0.0, 0.0, 0.0) == "" and report.interval(0.01, float("nan"), float("nan")) == ""
    assert [stats.verdict(p, p_match, mean) for p, p_match, mean in (
        (0.01, 0.5, -0.02), (0.01, 0.5, 0.02), (0.2, 0.5, -0.01), (0.01, 0.01, -0.004), (math.nan, 0.0, 0.0))] == [
        "below", "above", "not distinguishable from", "matches", ""]


def test_the_difference_adds_the_test_sets_noise_to_the_seeds_and_its_interval_is_a_t_interval():
    """A known case: seed differences d = (0.01, 0.02, 0.03), and per-example differences whose means over seeds
    have a known variance. SE² = var(d) / S + var_i(D̄_i) / N, with S - 1 = 2 degrees of freedom."""
    S, N = 3, 400
    items = np.zeros((S, N), dtype=np.int8)
    for s, k in enumerate((4, 8, 12)):  # seed s gets k more examples right than the baseline: d_s = k / N
        items[s, :k] = 1
    d = items.mean(1)
    got = stats.difference(d, items)
    se = math.sqrt(np.var(d, ddof=1) / S + np.var(items.mean(0), ddof=1) / N)
    assert got["diff_mean"] == pytest.approx(0.02)
    assert (got["diff_low"], got["diff_high"]) == pytest.approx((0.02 - 4.302652729911275 * se, 0.02 + 4.302652729911275 * se))
    assert got["p"] == pytest.approx(2 * scipy.stats.t(2).sf(0.02 / se))
    seeds_only = stats.difference(d)  # no per-example scores: the seeds' noise alone, a narrower interval
    assert seeds_only["diff_high"] - seeds_only["diff_low"] < got["diff_high"] - got["diff_low"]
    # "matches" exactly where the whole 95% interval lies within ±1 point
    assert (got["p_match"] < 0.05) == (got["diff_low"] > -0.01 and got["diff_high"] < 0.01)
    small = stats.difference(np.array([0.001, 0.002, 0.0015]))
    assert small["p_match"] < 0.05 and -0.01 < small["diff_low"] and small["diff_high"] < 0.01


def test_the_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Simulated: 5 seeds, 500 examples, seed noise and example noise; the interval must not be too narrow."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        p_example = rng.uniform(0.6, 0.99, 500)  # each example's chance to be right: the test set is a sample
        base = rng.random((5, 500)) < p_example
        shift = rng.normal(0.0, 0.01, (5, 1))  # a seed's own training luck, true mean difference 0
        other = rng.random((5, 500)) < np.clip(p_example + shift, 0, 1)
        items = other.astype(np.int8) - base
        got = stats.difference(items.mean(1), items)
        covered += got["diff_low"] <= 0 <= got["diff_high"]
    assert covered / 400 >= 0.93


def test_holm_adjusts_the_k_th_smallest_p_value_by_m_minus_k_plus_1_and_keeps_the_order():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    adjusted = stats.holm(p)
    assert adjusted[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])  # 4 x 0.005, 3 x 0.01, 2 x 0.03, max(1 x 0.04, 0.06)
    assert math.isnan(adjusted[4])
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 capped at 1, and never below an earlier one


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

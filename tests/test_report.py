"""Reporting: paired statistics, intervals and verdicts, and the figures, each rendered from the committed results
with its two panels and error bars that say what they are."""

import math

import pandas as pd

import pytest
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
    assert [report.verdict(lo, hi) for lo, hi in ((-0.02, -0.01), (0.01, 0.02), (-0.01, 0.01))] == [
        "below", "above", "not distinguishable from"]


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

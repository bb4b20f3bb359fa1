"""The figures: each renders from the committed results, with its two panels and error bars that say what they are."""

import json

import pytest
from matplotlib.figure import Figure

import report
import storage
import text_report
from config import Config


def committed_figure(experiment: str) -> Figure:
    out = storage.Outputs(experiment)
    results = storage.load_results(out)
    if experiment == "text":
        return text_report.plot(results, json.loads(out.config.read_text())["data"]["majority"])
    return report.plot(results, Config.default(experiment))


@pytest.mark.parametrize("experiment", ["mlp", "transformer", "text"])
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
    xs = report.side_by_side([[1000, 2000], [2000, 8000], [4000]], step=1.1)
    assert xs == [[1000, pytest.approx(2000 / 1.1 ** 0.5)], [pytest.approx(2000 * 1.1 ** 0.5), 8000], [4000]]

"""records.py: both budgets' choices read the tuning seeds' validation only, ties go to the smaller rate and the
earlier epoch, the test answers are read at the chosen epoch only, and the committed tables are what the committed
records give under today's rule and verdict words."""

import pandas as pd
import pytest

from experiments import storage
from experiments.text import records
from experiments.text.config import TASKS

ROOT = storage.ROOT


def search_of(counts: dict[tuple[float, int], list[int]], losses: dict | None = None) -> pd.DataFrame:
    """A search file: counts[(lr, epoch)] = one validation count per tuning seed; loss 0.3 unless given."""
    return pd.DataFrame([{"method": "m", "lr": lr, "seed": 100 + j, "epoch": e, "val_correct": c,
                          "loss": (losses or {}).get((lr, e), 0.3)}
                         for (lr, e), cs in counts.items() for j, c in enumerate(cs)])


def test_a_tie_goes_to_the_smaller_rate_then_to_the_earlier_epoch():
    tie = search_of({(1e-3, 1): [90, 90], (1e-3, 2): [90, 90], (1e-2, 1): [90, 90], (1e-2, 2): [90, 90]})
    assert records.choose_own(tie, 2, n_val=100) == {"m": (1e-3, 1)}
    later = search_of({(1e-3, 1): [80, 80], (1e-3, 2): [90, 90], (1e-2, 1): [95, 95], (1e-2, 2): [99, 99]})
    assert records.choose_own(later, 2, n_val=100) == {"m": (1e-2, 2)}
    assert records.choose_equal(later, 2, epochs=2, n_val=100) == {"m": (1e-2, 2)}


def test_a_flagged_epoch_is_out_of_the_own_budget():
    """protocol.flag read at each epoch: a loss risen above the first epoch's is out (diverged), and so is an
    epoch whose validation is still near chance (too slow), however the counts compare."""
    counts = {(1e-3, 1): [90, 90], (1e-3, 2): [99, 99]}
    risen = search_of(counts, losses={(1e-3, 2): 0.5})  # above the first epoch's 0.3
    assert records.choose_own(risen, 2, n_val=100) == {"m": (1e-3, 1)}
    slow = search_of({(1e-3, 1): [52, 53], (1e-2, 1): [51, 50]})  # 2 classes: near chance below 0.55
    assert records.choose_own(slow, 2, n_val=100) == {"m": (1e-3, 1)}  # every candidate out: the smallest rate


def test_no_choice_can_read_the_test_split():
    """choices() takes the search file alone, refuses reported seeds in it, and the tables read each run's test
    answers at the chosen epoch only: scrambling every other epoch's leaves the tables as they are."""
    search = search_of({(1e-3, 1): [5, 6], (1e-3, 2): [7, 7]})
    with pytest.raises(ValueError, match="tuning seeds only"):
        records.choices(search.assign(seed=0), 2, 2, n_val=10)
    chosen = {"m": (1e-3, 1)}
    methods = pd.DataFrame([{"method": "m", "kind": "lora", "rank": 1, "targets": "qv", "nf4": False, "alpha": 1.0,
                             "trainable_params": 10}])
    runs = pd.DataFrame([{"method": "m", "lr": 1e-3, "seed": s, "epoch": e, "loss": 0.3, "val_correct": 1,
                          "val_bits": "4:f0", "test_bits": f"4:{'c0' if e == 1 else 'f0'}"} for s in (0, 1) for e in (1, 2)])
    at = records.per_seed_at(runs, methods, chosen, 2, n_val=1)
    scrambled = runs.assign(test_bits=runs.test_bits.where(runs.epoch == 1, "4:00"))
    pd.testing.assert_frame_equal(at, records.per_seed_at(scrambled, methods, chosen, 2, n_val=1))
    assert at.test_acc.tolist() == [0.5, 0.5] and (at.epoch == 1).all()


@pytest.mark.parametrize("task", TASKS)
def test_the_committed_tables_are_what_the_committed_records_give(task):
    """The GPU run commits its records; the tables recomputed from them alone under today's protocol.choose and
    verdict words are the committed tables, byte for byte."""
    if not (records.search_path(ROOT, task).is_file() and records.runs_path(ROOT, task).is_file()):
        pytest.skip(f"no committed records of {task} yet ({records.search_path(ROOT, task).name}, "
                    f"{records.runs_path(ROOT, task).name}): they come with the GPU run (bench/README.md, "
                    "'The text experiment in pieces')")
    again = records.recompute(ROOT, [task])
    for budget in records.BUDGETS:
        committed = records.summary_path(ROOT, task, budget).read_bytes()
        assert again[task, budget] == committed, f"{task}, {budget} budget: re-read the records (records.recompute)"

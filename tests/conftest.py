"""What several test files share: the whole protocol on one experiment, with every file written."""

import pytest

from experiments import protocol, storage
from experiments import run as driver


@pytest.fixture(scope="session")
def run_pipeline():
    """run(exp, out) -> (grid, lrs, per_seed, results): tune, save the learning rates, read them back, sweep,
    summarize and save every file under `out`, with the run cache in out.root / "runs"."""
    def run(exp: protocol.Experiment, out: storage.Outputs):
        grid, per_seed, results = driver.run(exp, out, out.root / "runs", progress=False)
        lrs = storage.load_learning_rates(out, protocol.tuning_fields(exp.cfg), exp.tune_command())
        return grid, lrs, per_seed, results
    return run

"""What several test files share: the whole protocol on one experiment, with every file written."""

import pytest

from experiments import protocol, storage


@pytest.fixture(scope="session")
def run_pipeline():
    """run(exp, out) -> (grid, lrs, per_seed, results): tune, save the learning rates, read them back, sweep,
    summarize and save every file under `out`, with the run cache in out.root / "runs"."""
    def run(exp: protocol.Experiment, out: storage.Outputs):
        grid, chosen = protocol.tune(exp, out.root / "runs", progress=False)
        storage.save_learning_rates(out, protocol.tuning_fields(exp.cfg), grid, chosen)
        lrs = storage.load_learning_rates(out, protocol.tuning_fields(exp.cfg), exp.tune_command())
        per_seed = protocol.sweep(exp, lrs, out.root / "runs", progress=False)
        results = exp.summarize(per_seed)
        storage.save_results(out, exp.cfg, per_seed, results, exp.plot(results), exp.device, 1.0,
                             exp.config_extra(out, per_seed))
        return grid, lrs, per_seed, results
    return run

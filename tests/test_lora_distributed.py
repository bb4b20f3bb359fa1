"""lora.py under DistributedDataParallel and FSDP2's fully_shard (issue 10): 2 CPU processes, gloo.

One step on two processes, each with half the batch, equals one step of one process on the whole batch.
The two processes run once for all tests here (tests/distributed_step.py), about 15 s on 2 cores.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import lora
from distributed_step import batch, make_model, sgd_step, trained

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed_step.py"), str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out / "results.pt")


@pytest.fixture(scope="module")
def one_process():
    """The same step by one process on the whole batch: the reference."""
    model = make_model()
    before = trained(model)
    x, y = batch()
    sgd_step(model, x, y)
    return model, before


def assert_same_step(got, one_process):
    model, before = one_process
    want = trained(model)
    assert got.keys() == want.keys()
    assert {k.rsplit(".", 1)[-1] for k in got} == {"lora_A", "lora_B", "lora_magnitude", "bias", "weight"}
    for k in want:
        assert not torch.equal(want[k], before[k]), f"{k} did not move, so the comparison would prove nothing"
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_ddp_step_on_two_processes_equals_one_process_on_the_whole_batch(two_processes, one_process):
    assert_same_step(two_processes["ddp"], one_process)


def test_an_fsdp2_fully_shard_step_on_two_processes_equals_one_process_on_the_whole_batch(two_processes,
                                                                                         one_process):
    assert two_processes["fsdp_sharded"]  # every parameter was a DTensor shard
    assert_same_step(two_processes["fsdp"], one_process)


def test_merge_lora_refuses_sharded_weights_and_merges_a_copy_from_the_full_state_dict(two_processes,
                                                                                      one_process):
    assert "sharded (a DTensor" in two_processes["merge_error"]
    model, _ = one_process
    x, _ = batch()
    expected = lora.merge_lora(copy.deepcopy(model))(x)
    torch.testing.assert_close(two_processes["merged_output"], expected, rtol=1e-5, atol=1e-6)

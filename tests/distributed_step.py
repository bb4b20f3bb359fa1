"""One training step of a LoRA + DoRA model under DDP and under FSDP2's fully_shard, on 2 CPU processes (gloo).

    python tests/distributed_step.py OUT_DIR      # writes OUT_DIR/results.pt; run by tests/test_lora_distributed.py

Each process takes its half of one batch; the test compares the result with one process stepping on the whole
batch (make_model, batch and sgd_step below are what both sides share).
"""

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402

WORLD = 2


def make_model() -> nn.Module:
    """A block with a LoRA layer and a DoRA layer, then a head trained in full; B already moved, so A trains."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()),
                          nn.Linear(32, 4))
    lora.add_lora(model, r=4, alpha=8, targets="0.0")
    lora.add_lora(model, r=4, alpha=8, targets="0.2", use_dora=True)
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    model[1].requires_grad_(True)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_B.normal_(0, 0.3)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(8, 16), torch.randint(0, 4, (8,))


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Plain SGD: the update is proportional to the gradient, so any error in it shows."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters as full tensors (a collective under FSDP: every process must call it)."""
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p
    return {n: full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def worker(rank: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=WORLD)
    x, y = batch()
    mine = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)

    ddp = make_model()
    sgd_step(DistributedDataParallel(ddp), x[mine], y[mine])

    fsdp = make_model()
    fully_shard(fsdp[0])  # the block, as FSDP2 shards a transformer block
    fully_shard(fsdp)
    sgd_step(fsdp, x[mine], y[mine])
    sharded = all(hasattr(p, "full_tensor") for p in fsdp.parameters())
    try:
        lora.merge_lora(fsdp)
        merge_error = None
    except ValueError as e:
        merge_error = str(e)
    state = get_model_state_dict(fsdp, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fsdp_trained = trained(fsdp)
    if rank == 0:  # merge an unsharded copy loaded from the full state dict, as merge_lora asks under FSDP
        copy = make_model()
        copy.load_state_dict(state)
        lora.merge_lora(copy)
        torch.save({"ddp": trained(ddp), "fsdp": fsdp_trained, "fsdp_sharded": sharded,
                    "merge_error": merge_error, "merged_output": copy(x).detach()}, out / "results.pt")
    dist.barrier()  # both ranks done before either leaves: a rank leaving early can abort the other
    # Then leave at once, without gloo's teardown or the interpreter's: on a 2-core Intel Xeon one worker in two
    # runs aborted after its work was done ("terminate called without an active exception", a C++ thread still
    # joinable in a destructor at exit), which failed the test though every result was right and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mp.spawn(worker, args=(Path(sys.argv[1]),), nprocs=WORLD)

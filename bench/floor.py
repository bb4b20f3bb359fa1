"""Question 3: the floor. Count the matmul FLOPs of the default sweep and divide by the matmul rate measured on
this machine; compare with the measured sweep time.

    python bench/floor.py [--device auto|cpu|cuda]

FLOPs are counted by torch.utils.flop_counter on one training step of one model per phase and method (forward
and backward), then multiplied by the number of steps and seeds; evaluations are counted the same way, chunk by
chunk as the trainer runs them. The count is per model: where the stacked step computes a frozen W x once per
seed for all learning rates (the search), it does less than this. Only
matmuls are counted: elementwise work, the optimizer and the random numbers of dropout are not, so the floor is
a lower bound. The rate is the best of a few large float32 matmuls, the most this machine does per second.
"""

import argparse
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common import default_learning_rates, record, table, wall  # first: puts the repo on sys.path
from experiments import protocol
from experiments.methods import resolve_device
from experiments.mnist.config import Config
from experiments.mnist.experiment import MnistExperiment
from experiments.mnist.models import add_adapter, make_mlp
from experiments.mnist.tasks import load_tasks
from experiments.trainer import EVAL_CHUNK


def step_flops(model, x, y) -> int:
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def forward_flops(model, x) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def eval_flops(model, x, n: int) -> int:
    """Forward FLOPs over n examples in the trainer's chunks (per-call work, such as DoRA's weight norm, once a
    chunk, not once an example)."""
    return (n // len(x)) * forward_flops(model, x) + (forward_flops(model, x[:n % len(x)]) if n % len(x) else 0)


def sweep_flops(cfg: Config, tasks) -> dict[str, int]:
    """Matmul FLOPs of each phase of the default sweep, all seeds together."""
    bs, S = cfg.batch_size, cfg.seeds
    x, y = torch.randn(bs, 784), torch.randint(0, 5, (bs,))
    xe = torch.randn(EVAL_CHUNK, 784)
    n = {t: {s: len(tasks[t][s][1]) for s in tasks[t]} for t in tasks}
    out = {"pretrain": S * cfg.pretrain_epochs * (n["A"]["train"] // bs) * step_flops(make_mlp(), x, y)}
    out["evaluation"] = S * sum(eval_flops(make_mlp(), xe, n[t]["test"]) for t in "AB")  # after pretraining
    for method in cfg.methods:
        model, r = make_mlp(), method.rank
        if r is not None:
            add_adapter(model, method)
        out[method.name] = S * cfg.finetune_epochs * (n["B"]["train"] // bs) * step_flops(model, x, y)
        splits = [n["B"]["val"], n["B"]["test"], n["A"]["test"]] + ([] if r is None else [n["A"]["test"]])
        out["evaluation"] += S * sum(eval_flops(model, xe, k) for k in splits)
    return out


def matmul_rate(device: torch.device) -> float:
    """FLOP/s: the best of a few float32 matmuls of growing size."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        reps = 20 if device.type == "cpu" else 200
        a @ b
        t = wall(lambda: [a @ b for _ in range(reps)], device)
        best = max(best, 2 * n**3 * reps / t)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")
    torch.backends.cuda.matmul.allow_tf32 = False  # the sweep runs in float32; so does the rate
    cfg = Config()
    flops = sweep_flops(cfg, load_tasks(cfg, torch.device("cpu")))
    total = sum(flops.values())
    rate = matmul_rate(device)
    lrs = default_learning_rates(cfg)
    with tempfile.TemporaryDirectory() as cache:
        measured = wall(lambda: protocol.sweep(MnistExperiment(cfg, device), lrs, cache, progress=False), device)
    floor = total / rate
    rows = [[k, f"{v / 1e9:.1f}"] for k, v in flops.items()] + [["**total**", f"**{total / 1e9:.1f}**"]]
    body = table(["phase", "GFLOP (matmuls, fwd + bwd)"], rows)
    body += "\n\n" + table(["matmul rate (GFLOP/s)", "floor (s)", "measured sweep (s)", "measured / floor"],
                           [[f"{rate / 1e9:.0f}", f"{floor:.2f}", f"{measured:.2f}", f"**{measured / floor:.1f}x**"]])
    record("3. The floor: sweep FLOPs / measured matmul rate", body, device)


if __name__ == "__main__":
    main()

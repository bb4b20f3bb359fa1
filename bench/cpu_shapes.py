"""Why layout matters on the CPU, one thread: the MLP search's LoRA products in the shapes vmap gives them
against the shapes stacked_mlp.py uses, and the evaluation of 12 stacked row transformers by chunk size.

    python bench/cpu_shapes.py [--threads 1]

A search job is 12 models: 6 learning rates x 2 seeds, batch 128, the first layer 784 -> 64 with LoRA rank r.
"""

import argparse
import time

import torch

from common import median, record, table  # first: puts the repo on sys.path
from experiments.mnist.models import make_model
from experiments.mnist.config import Config
from experiments.mnist.tasks import load_tasks
from experiments.trainer import accuracy, stack


def ms(fn, n: int = 200) -> float:
    """Median milliseconds of fn() over n calls, after 5 to warm up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


def matmul_rows(r: int) -> list[list[str]]:
    L, G, B, n_in = 6, 2, 128, 784
    x = torch.randn(L * G, B, n_in)  # the batch, copied for every model (what vmap hands the matmul)
    x_seed = torch.randn(G, B, n_in)  # the batch once per seed
    A, g = torch.randn(L * G, r, n_in), torch.randn(L * G, B, r)
    A_cat, g_cat = torch.randn(G, n_in, L * r), torch.randn(G, B, L * r)
    flops = 2 * L * G * B * n_in * r
    cases = [(f"x Aᵀ, one product per model: (12, 128, 784) @ (12, 784, {r})", lambda: torch.bmm(x, A.transpose(1, 2))),
             (f"x Aᵀ, every learning rate's A at once: (2, 128, 784) @ (2, 784, {L * r})", lambda: torch.bmm(x_seed, A_cat)),
             (f"A's gradient as vmap takes it: (12, 784, 128) @ (12, 128, {r})", lambda: torch.bmm(x.transpose(1, 2), g)),
             (f"A's gradient, stacked: (2, 784, 128) @ (2, 128, {L * r})", lambda: torch.bmm(x_seed.transpose(1, 2), g_cat))]
    rows = []
    for name, fn in cases:
        t = ms(fn)
        rows.append([name, f"{t:.3f}", f"{flops / t / 1e6:.1f}"])
    return rows


def eval_rows() -> list[list[str]]:
    cfg = Config.transformer()
    split = load_tasks(cfg, torch.device("cpu"))["B"]["test"]
    model = make_model("transformer", 0.0)
    params = stack([make_model("transformer", 0.0).state_dict() for _ in range(12)])
    return [[str(chunk), f"{ms(lambda: accuracy(model, params, split, chunk=chunk), 3) / 1e3:.2f}"]
            for chunk in (128, 256, 512, 1024, len(split[1]))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    body = table(["product (r = rank)", "ms", "GFLOP/s"], matmul_rows(1) + matmul_rows(8) + matmul_rows(64))
    body += ("\n\nAccuracy of 12 stacked row transformers on the 4,861 test images of digits 5-9, by chunk size:\n\n"
             + table(["examples per forward", "seconds (median of 3)"], eval_rows()))
    record(f"6. Layouts on the CPU, {args.threads} thread(s)", body, torch.device("cpu"))


if __name__ == "__main__":
    main()

"""
One training step of the text experiment on a GPU: the plain loop (one model, Hugging Face's BertModel with
lora.py, eager, batch trimmed to its longest review) against the stacked trainer (S models in one pass over the
functional encoder, fixed length, CUDA graph), at each task's length, in the same run.

    python bench/text_step.py            # prints markdown rows for bench/RESULTS.md

Milliseconds per step are the difference of two timed runs (long minus short, divided by the extra steps), so
set-up, graph capture and evaluation are left out. Tokens per second count every model's tokens. The share of
the GPU's bf16 matrix rate divides stacked.train_flops (matrix multiplies only) by the time and by the rate of an
8192^3 bf16 product measured in the same run.
"""

import datetime
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import trainer  # noqa: E402
from experiments.methods import Method  # noqa: E402
from experiments.plain_loop import plain_fit  # noqa: E402
from experiments.text import data, stacked  # noqa: E402
from experiments.text.experiment import TextSetup, build_model  # noqa: E402
from experiments.text.model import load_encoder  # noqa: E402

DEVICE = torch.device("cuda")
BATCH = 32


def matmul_rate(n: int = 8192, reps: int = 10) -> float:
    """bf16 FLOP/s of an n^3 product on random data, mean of `reps` after 3 warm-ups."""
    a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def timed(run, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    run(steps)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def per_step(run, short: int = 20, long: int = 100) -> float:
    """Seconds per step: (time of `long` steps - time of `short` steps) / (long - short), after one warm-up."""
    run(short)
    return (timed(run, long) - timed(run, short)) / (long - short)


def setup(length: int, n: int) -> TextSetup:
    ids = torch.randint(1000, 30000, (n, length), device=DEVICE)  # every token real: no padding
    y = torch.randint(0, 2, (n,), device=DEVICE)
    encoder = load_encoder(data.find_minilm()[0]).to(DEVICE)
    return TextSetup({"train": (ids, y)}, encoder, {}, {}, {})


def plain(s: TextSetup, method: Method, steps: int) -> None:
    model = build_model(s, method)
    ids, y = s.splits["train"]
    plain_fit(model, (ids[:steps * BATCH], (ids[:steps * BATCH] != 0).long()), y[:steps * BATCH], 0, 1e-3, 1, BATCH,
              amp_dtype=torch.bfloat16, fused=True)


def stacked_run(s: TextSetup, method: Method, S: int, steps: int) -> dict:
    models = []
    for seed in range(S):
        trainer.set_seed(seed)
        models.append(build_model(s, method))
    params = stacked.stack_models(models)
    ids, y = s.splits["train"]

    def fwd(p, xb):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return stacked.forward(p, xb, s.encoder.config, train=True)
    trainer.fit(models[0], params, (ids[:steps * BATCH], y[:steps * BATCH]), list(range(S)), [1e-3] * S, 1, BATCH,
                stacked_forward=fwd)
    return params


def main() -> None:
    peak = matmul_rate()
    print(f"{datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16 matmul "
          f"8192^3: {peak / 1e12:.0f} TFLOP/s\n")
    print("| task length | method | loop | models per step | ms/step | tokens/s | share of bf16 matmul rate | "
          "peak memory |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for length in (64, 256):
        s = setup(length, 100 * BATCH)
        for method in (Method("lora", 8, "qv"), Method("full")):
            for S in (1, 12):
                params = stacked_run(s, method, S, 1)  # only for the FLOP count
                flops = stacked.train_flops(params, s.encoder.config, S * BATCH * length, length)
                for loop in (("plain", "stacked") if S == 1 else ("stacked",)):
                    torch.cuda.reset_peak_memory_stats()
                    run = (functools.partial(plain, s, method) if loop == "plain"
                           else functools.partial(stacked_run, s, method, S))
                    sec = per_step(run)
                    mem = torch.cuda.max_memory_allocated() / 2 ** 30
                    print(f"| {length} | {method.name} | {loop} | {S} | {1e3 * sec:.2f} | "
                          f"{S * BATCH * length / sec:,.0f} | {100 * flops / sec / peak:.1f}% | {mem:.1f} GiB |",
                          flush=True)


if __name__ == "__main__":
    main()

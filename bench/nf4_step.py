"""QLoRA's speed: the LoRA training step over a 4-bit base (nf4.py's LinearNF4) against over a bf16 nn.Linear.

    python bench/nf4_step.py                     # one GPU: 4096 x 4096, 8 x 512 tokens, r = 8
    python bench/nf4_step.py --compile           # also with dequantize_nf4 under torch.compile (torch only)
    python bench/nf4_step.py --profile           # also the kernels of 5 steps of each base (torch.profiler)
    python bench/nf4_step.py --size 256 --tokens 64 --device cpu --repeats 3    # a smoke test on the CPU

The step: forward + backward of one lora.LoRALinear (r = 8, alpha = 16, float32 adapters: lora.py's default on a
half-precision base), its input requiring grad as inside a network, over (a) a frozen bf16 nn.Linear, (b) the
same weight in NF4 (LinearNF4.from_linear: double quantization, bf16 compute); also the frozen bases alone.
Then dequantize_nf4 alone against its byte floor: the bytes it must move (read the packed codes, the 8-bit absmax
codes and the second-level scales; write the bf16 weight) over the memory bandwidth (--bandwidth, 4.8 TB/s: an
H200's HBM3e). Medians of CUDA-event timings (wall clock on the CPU), the same input tensors for every layer;
peak memory above what the step starts with (CUDA only). On CUDA the table is appended to bench/RESULTS.md.
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from common import machine, record, table  # first: puts the repo on sys.path
from lora_layer import cuda_ms, peak_mib, train_step

import lora
import nf4


def cpu_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() over `repeats` runs, by the wall clock."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def qlora(base: nn.Module, r: int) -> lora.LoRALinear:
    layer = lora.LoRALinear(copy.deepcopy(base), r=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)  # a trained-looking adapter: B = 0 would let nothing special happen
    return layer.train()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=4096, help="d_in = d_out")
    p.add_argument("--tokens", type=int, default=8 * 512, help="tokens per step (batch x sequence)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--device", default="cuda")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes per second for the dequantize floor")
    p.add_argument("--compile", action="store_true", help="also time dequantize_nf4 under torch.compile")
    p.add_argument("--profile", action="store_true", help="print the kernels of 5 training steps of each base")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: pass --device cpu for a smoke test")
    ms = (lambda fn: cuda_ms(fn, args.repeats)) if cuda else (lambda fn: cpu_ms(fn, args.repeats))
    mib = peak_mib if cuda else (lambda fn: float("nan"))

    torch.manual_seed(0)
    dense = nn.Linear(args.size, args.size, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    four_bit = nf4.LinearNF4.from_linear(dense)  # bf16 compute, double quantization
    x = torch.randn(args.tokens, args.size, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(args.tokens, args.size, device=dev, dtype=torch.bfloat16)
    eager_dequantize = nf4.dequantize_nf4
    variants = {"eager": eager_dequantize}
    if args.compile:  # (dynamo traces through nf4's cached codebook lookup and warns once that it does so)
        variants["compiled"] = torch.compile(eager_dequantize)

    rows = []
    for base_name, base in (("bf16 nn.Linear", dense), ("NF4 LinearNF4", four_bit)):
        for variant, dequantize in variants.items() if base is four_bit else [("", None)]:
            if dequantize is not None:
                nf4.dequantize_nf4 = dequantize  # NF4Weight.dequantize calls it: the variant runs inside the step
            layer = qlora(base, args.r)
            frozen, step = train_step(base, x, gy), train_step(layer, x, gy)
            rows.append([f"{base_name} {variant}".strip(), ms(frozen), ms(step), mib(step)])
    nf4.dequantize_nf4 = eager_dequantize
    dense_step = rows[0][2]
    body = table(["base", "frozen base alone (ms)", "LoRA step, r = %d (ms)" % args.r, "step / bf16 step",
                  "peak MiB of the step"],
                 [[name, f"{f:.3f}", f"{s:.3f}", f"**{s / dense_step:.2f}x**", f"{m:.0f}"]
                  for name, f, s, m in rows])

    weight = four_bit.weight
    n = args.size * args.size
    moved = sum(b.numel() * b.element_size() for b in weight.buffers()) + 2 * n  # read the NF4 form, write bf16
    floor_ms = 1e3 * moved / args.bandwidth
    deq = []
    with torch.no_grad():
        for variant, dequantize in variants.items():
            t = ms(lambda: dequantize(weight))
            deq.append([variant, f"{t:.4g}", f"{floor_ms:.4g}", f"**{t / floor_ms:.1f}x**",
                        f"{1e-9 * moved / (t / 1e3):.0f}"])
    body += ("\n\nDequantize alone (dequantize_nf4 of the NF4 weight to bf16, no grad):\n\n" +
             table(["dequantize_nf4", "time (ms)", f"byte floor at {args.bandwidth / 1e12:.1f} TB/s (ms)",
                    "time / floor", "achieved GB/s"], deq))
    body += (f"\n\nd_in = d_out = {args.size}, {args.tokens} tokens, bf16 compute, r = {args.r}, alpha = {2 * args.r},"
             f" float32 adapters; medians of {args.repeats} "
             f"{'CUDA-event' if cuda else 'wall-clock'} timings of forward + backward (input requiring grad). "
             f"The dequantize floor moves {moved / 2**20:.1f} MiB: {n // 2} bytes of codes, the 8-bit absmax and "
             f"second-level scales, and {2 * n} bytes of bf16 out.")
    if cuda:
        record("QLoRA: the LoRA step over an NF4 base (nf4.LinearNF4) against over a bf16 nn.Linear", body, dev)
    else:
        print(f"{machine(dev)} (CPU run: printed, not recorded)\n\n{body}")
    if args.profile:
        profile(dense, four_bit, x, gy, args.r, cuda)


def profile(dense, four_bit, x, gy, r: int, cuda: bool) -> None:
    """Print the operators of 5 LoRA training steps over each base, most time first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    for name, base in (("bf16 nn.Linear", dense), ("NF4 LinearNF4", four_bit)):
        step = train_step(qlora(base, r), x, gy)
        step()
        with torch_profile(activities=[activity]) as prof:
            for _ in range(5):
                step()
            if cuda:
                torch.cuda.synchronize()
        print(f"\nLoRA step over {name}, 5 steps:")
        print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

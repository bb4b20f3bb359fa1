"""Question 4: LoRALinear at the shapes people copy it into, on a GPU: d_in = d_out = 4096, 16k tokens, bf16.

    python bench/lora_layer.py            # needs CUDA and, for the comparison, peft (a benchmark-only dependency)
    python bench/lora_layer.py --dora     # the same training step for DoRA, against PEFT's use_dora=True layer

Training step (forward + backward, input requiring grad as inside a network) for (a) a frozen nn.Linear,
(b) our unmerged LoRALinear with its default float32 adapter, (c) PEFT's LoRA Linear with its default float32
adapter (autocast_adapter_dtype), same r, alpha and dropout; then both with bf16 adapters, ours twice: with the
fused addmm of LoRALinear.forward and with the plain formula F.linear(x, W, b) + s · dropout(x) Aᵀ Bᵀ (the
before/after of keeping the addmm); peak memory above what the step starts with; and inference of our merged
layer against nn.Linear. With --dora, (b) and (c) are the DoRA layers (float32 adapters and magnitudes), next
to our LoRA step for its overhead.
Medians of CUDA-event timings over many repeats, the same input tensors for every layer.
"""

import argparse
import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import record, table

import lora

D, TOKENS = 4096, 16 * 1024


def cuda_ms(fn, repeats: int, warmup: int = 10) -> float:
    """Median milliseconds of fn() over `repeats` runs, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def train_step(layer, x, gy):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(gy)
    return step


def peak_mib(fn) -> float:
    """Peak memory allocated during fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


class Holder(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear


def peft_layer(base: nn.Linear, r: int, alpha: float, dropout: float, use_dora: bool = False,
               fp32: bool = True) -> nn.Module:
    import peft
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], use_dora=use_dora)
    # PEFT's default autocast_adapter_dtype=True keeps the adapter in float32, as ours; False keeps it in bf16
    model = peft.get_peft_model(Holder(copy.deepcopy(base)), cfg, autocast_adapter_dtype=fp32)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.01)
    return layer.train()


def ours(base: nn.Linear, r: int, alpha: float, dropout: float, use_dora: bool = False,
         adapter_dtype: torch.dtype | None = None) -> lora.LoRALinear:
    layer = lora.LoRALinear(copy.deepcopy(base), r=r, alpha=alpha, dropout=dropout, use_dora=use_dora,
                            adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.01)
    return layer.train()


class PlainFormula(lora.LoRALinear):
    """LoRALinear without the fused addmm: the formula as written, for the before/after of keeping it."""

    def forward(self, x):
        x_drop = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x_drop, self.lora_A), self.lora_B) * self.scaling


def plain(base: nn.Linear, r: int, alpha: float, dropout: float) -> PlainFormula:
    layer = ours(base, r, alpha, dropout, adapter_dtype=base.weight.dtype)
    layer.__class__ = PlainFormula
    return layer


def dora_rows(base: nn.Linear, x: torch.Tensor, gy: torch.Tensor, ranks: list[int], repeats: int,
              frozen_ms: float) -> list[list]:
    """One table row per (r, dropout): the DoRA training step, ours against PEFT's, and our LoRA step beside it."""
    rows = []
    for r in ranks:
        for dropout in (0.0, 0.1):
            layers = {"lora": ours(base, r, 2 * r, dropout), "ours": ours(base, r, 2 * r, dropout, use_dora=True),
                      "peft": peft_layer(base, r, 2 * r, dropout, use_dora=True)}
            ms = {k: cuda_ms(train_step(m, x, gy), repeats) for k, m in layers.items()}
            mem = {k: peak_mib(train_step(m, x, gy)) for k, m in layers.items() if k != "lora"}
            rows.append([r, dropout, f"{frozen_ms:.3f}", f"{ms['lora']:.3f}", f"{ms['ours']:.3f}",
                         f"{ms['peft']:.3f}", f"**{ms['ours'] / ms['peft']:.2f}x**",
                         f"{ms['ours'] / ms['lora']:.2f}x", f"{mem['ours']:.0f}", f"{mem['peft']:.0f}"])
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--profile", action="store_true", help="also print the CUDA kernels of one step at r=16")
    p.add_argument("--dora", action="store_true", help="time DoRA (use_dora=True) against PEFT's DoRA instead")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/lora_layer.py times CUDA kernels: it needs a CUDA GPU")
    import peft
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = nn.Linear(D, D, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(TOKENS, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(TOKENS, D, device=dev, dtype=torch.bfloat16)
    frozen_ms = cuda_ms(train_step(base, x, gy), args.repeats)
    frozen_mem = peak_mib(train_step(base, x, gy))
    if args.dora:
        body = table(["r", "dropout", "frozen nn.Linear (ms)", "ours LoRA (ms)", "ours DoRA (ms)", "PEFT DoRA (ms)",
                      "ours / PEFT", "DoRA / LoRA (ours)", "peak MiB ours DoRA", "peak MiB PEFT DoRA"],
                     dora_rows(base, x, gy, args.ranks, args.repeats, frozen_ms))
        body += (f"\n\nd_in = d_out = {D}, {TOKENS} tokens, bf16, alpha = 2r, medians of {args.repeats} CUDA-event "
                 f"timings of forward + backward; peak memory above the memory held before the step. "
                 f"PEFT {peft.__version__}; adapters and magnitudes in float32 in both (each one's default).")
        record("4d. DoRA, float32 adapters and magnitudes (both defaults): LoRALinear(use_dora=True) against "
               "PEFT's DoRA Linear", body, dev)
    else:
        train_and_infer(base, x, gy, frozen_ms, frozen_mem, args, peft.__version__, dev)
    if args.profile:
        profile(base, x, gy, args.dora)


def train_and_infer(base, x, gy, frozen_ms, frozen_mem, args, peft_version, dev) -> None:
    rows = []
    for r in args.ranks:
        for dropout in (0.0, 0.1):
            bf16 = base.weight.dtype
            layers = {"ours": ours(base, r, 2 * r, dropout), "peft": peft_layer(base, r, 2 * r, dropout),
                      "ours16": ours(base, r, 2 * r, dropout, adapter_dtype=bf16),
                      "plain16": plain(base, r, 2 * r, dropout),
                      "peft16": peft_layer(base, r, 2 * r, dropout, fp32=False)}
            ms = {k: cuda_ms(train_step(m, x, gy), args.repeats) for k, m in layers.items()}
            mem = {k: peak_mib(train_step(m, x, gy)) for k, m in layers.items()}
            rows.append([r, dropout, f"{frozen_ms:.3f}", f"{ms['ours']:.3f}", f"{ms['peft']:.3f}",
                         f"**{ms['ours'] / ms['peft']:.2f}x**", f"{ms['ours'] / frozen_ms:.2f}x",
                         f"{frozen_mem:.0f}", f"{mem['ours']:.0f}", f"{mem['peft']:.0f}",
                         f"{ms['ours16']:.3f}", f"{ms['plain16']:.3f}", f"{ms['peft16']:.3f}",
                         f"**{ms['ours16'] / ms['plain16']:.2f}x**", f"{mem['ours16']:.0f}", f"{mem['plain16']:.0f}",
                         f"{mem['peft16']:.0f}"])
    body = table(["r", "dropout", "frozen nn.Linear (ms)", "ours (ms)", "PEFT (ms)", "ours / PEFT",
                  "ours / frozen", "peak MiB frozen", "peak MiB ours", "peak MiB PEFT",
                  "bf16 adapters: ours, fused addmm (ms)", "ours, plain formula (ms)", "PEFT (ms)",
                  "addmm / plain", "peak MiB addmm", "peak MiB plain", "peak MiB PEFT"], rows)

    infer = []
    with torch.no_grad():
        xi = x.detach()
        linear_ms = cuda_ms(lambda: base(xi), args.repeats)
        for r in args.ranks:
            merged = ours(base, r, 2 * r, 0.0).eval()
            merged.merge()
            deployed = lora.merge_lora(Holder(ours(base, r, 2 * r, 0.0))).proj
            m_ms, d_ms = cuda_ms(lambda: merged(xi), args.repeats), cuda_ms(lambda: deployed(xi), args.repeats)
            infer.append([r, f"{linear_ms:.3f}", f"{m_ms:.3f}", f"**{m_ms / linear_ms:.3f}x**", f"{d_ms:.3f}"])
    body += ("\n\nInference (no grad), merged:\n\n" +
             table(["r", "nn.Linear (ms)", "LoRALinear.merge() (ms)", "merged / nn.Linear", "merge_lora (ms)"],
                   infer))
    body += (f"\n\nd_in = d_out = {D}, {TOKENS} tokens, bf16, alpha = 2r, medians of {args.repeats} CUDA-event "
             f"timings; peak memory is above the memory held before the step (weights, input, output grad). "
             f"PEFT {peft_version}. Columns 4-10: float32 adapters on the bf16 base, each one's default; the "
             f"later columns: bf16 adapters (adapter_dtype=torch.bfloat16, PEFT's autocast_adapter_dtype=False).")
    record("4c. LoRALinear (float32 adapters, the default) against PEFT's LoRA Linear and a frozen nn.Linear; "
           "the fused addmm against the plain formula", body, dev)


def profile(base, x, gy, use_dora: bool) -> None:
    """Print the CUDA kernels of 10 training steps at r=16: frozen, ours, PEFT (DoRA layers with use_dora)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    kind = "DoRA" if use_dora else "LoRA"
    for name, layer in (("frozen nn.Linear", base), (f"ours {kind} r=16", ours(base, 16, 32, 0.0, use_dora)),
                        (f"PEFT {kind} r=16", peft_layer(base, 16, 32, 0.0, use_dora))):
        step = train_step(layer, x, gy)
        step()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"\n{name}, 10 steps:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


if __name__ == "__main__":
    main()

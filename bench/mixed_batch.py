"""A batch in which each example picks its adapter: lora.adapter_per_example (stacked A and B, and sub-batches)
against PEFT's adapter_names= and against a batch through one adapter, for K adapters at r = 8.

    python bench/mixed_batch.py [--device cpu] [--append]

The model: 4 × (nn.Linear(768, 768), GELU), every Linear adapted; 64 examples of 32 tokens, float32; the examples
take the K adapters in turn. Inference under torch.no_grad in eval mode (PEFT's adapter_names is inference only), and
a training step (forward, backward). The fastest of --repeats interleaved rounds after one warm-up.
"""

import argparse
import copy
import datetime

import torch
import torch.nn as nn

from common import RESULTS, machine, table, wall

import lora

DIM, LAYERS, EXAMPLES, TOKENS, R = 768, 4, 64, 16, 8


def make_base(device):
    torch.manual_seed(0)
    layers = [m for _ in range(LAYERS) for m in (nn.Linear(DIM, DIM), nn.GELU())]
    return nn.Sequential(*layers).to(device).eval()


def ours_with(k, device):
    model = make_base(device)
    for i in range(k):
        lora.add_lora(model, r=R, alpha=16, targets=[str(2 * j) for j in range(LAYERS)], adapter=f"a{i}")
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for a in layer.configs:
                layer.adapter_tensors(a)["lora_B"].normal_(0, 0.01)
    lora.mark_only_lora_as_trainable(model, adapters=lora.adapter_names(model))
    return model


def peft_with(k, device):
    import peft
    targets = [str(2 * j) for j in range(LAYERS)]
    model = peft.get_peft_model(make_base(device), peft.LoraConfig(r=R, lora_alpha=16, target_modules=targets),
                                adapter_name="a0")
    for i in range(1, k):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=R, lora_alpha=16, target_modules=targets))
    return model.eval()


def ours_mixed(model, x, names, stack, train):
    """Our model on the mixed batch: A and B stacked (stack=True), sub-batches (False) or as lora decides (None)."""
    def run():
        saved = lora.STACK_MAX_RANK
        if stack is not None:
            lora.STACK_MAX_RANK = 10**9 if stack else 0
        try:
            with lora.adapter_per_example(model, names), torch.set_grad_enabled(train):
                out = model(x)
                if train:
                    out.square().mean().backward()
        finally:
            lora.STACK_MAX_RANK = saved
    return run


def one_adapter(model, x, train):
    def run():
        with torch.set_grad_enabled(train):
            out = model(x)
            if train:
                out.square().mean().backward()
    return run


def main(device, repeats):
    """The table: the fastest of `repeats` rounds, each round timing every variant once in turn (the CPU is shared:
    interleaving spreads what others run over all variants alike)."""
    x = torch.randn(EXAMPLES, TOKENS, DIM, device=device)
    rows = []
    for k in (2, 8, 32):
        names = [f"a{i % k}" for i in range(EXAMPLES)]
        ours = ours_with(k, device)
        single = copy.deepcopy(ours)
        lora.set_adapter(single, "a0")
        variants = {"one": one_adapter(single, x, False), "stacked": ours_mixed(ours, x, names, True, False),
                    "sub": ours_mixed(ours, x, names, False, False), "auto": ours_mixed(ours, x, names, None, False),
                    "one_train": one_adapter(single, x, True), "auto_train": ours_mixed(ours, x, names, None, True)}
        try:
            theirs = peft_with(k, device)

            def peft_mixed():
                with torch.no_grad():
                    theirs(x, adapter_names=names)
            variants["peft"] = peft_mixed
        except ImportError:
            pass
        times = {v: [] for v in variants}
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(repeats):
            for v, fn in variants.items():
                times[v].append(wall(fn, device))
        t = {v: min(ts) for v, ts in times.items()}
        t.setdefault("peft", float("nan"))
        ms = lambda v: f"{1000 * t[v]:.1f}"  # noqa: E731
        rows.append([k, k * R, ms("one"), ms("stacked"), ms("sub"), f"**{ms('auto')}**", ms("peft"),
                     f"{t['auto'] / t['one']:.2f}x", f"{t['peft'] / t['auto']:.2f}x", ms("one_train"),
                     ms("auto_train"), f"{t['auto_train'] / t['one_train']:.2f}x"])
        print(rows[-1], flush=True)
    header = ["K", "K·r", "one adapter (ms)", "ours stacked", "ours sub-batches", "ours (as lora picks)",
              "PEFT adapter_names", "ours / one adapter", "PEFT / ours", "train: one adapter", "train: ours",
              "train: ours / one"]
    return table(header, rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = main(device, args.repeats)
    print(result)
    if args.append:
        with RESULTS.open("a") as f:
            f.write(f"\n### 9. Issue 34: a batch in which each example picks its adapter (K adapters, r = {R})\n\n"
                    f"`python bench/mixed_batch.py --device {args.device} --append` on {machine(device)}, "
                    f"{datetime.date.today()}\n\n{result}\n\n"
                    f"{LAYERS} × nn.Linear({DIM}, {DIM}) + GELU, every Linear adapted, {EXAMPLES} examples × {TOKENS} "
                    f"tokens, float32, the fastest of {args.repeats} interleaved rounds. Inference under no_grad in "
                    f"eval mode; train: forward and backward. \"ours (as lora picks)\" stacks A and B while K·r <= "
                    f"lora.STACK_MAX_RANK ({lora.STACK_MAX_RANK}), else runs sub-batches. The examples take the K "
                    "adapters in turn. The CPU is shared with other jobs: compare within a row. On a GPU: not yet "
                    "measured.\n")

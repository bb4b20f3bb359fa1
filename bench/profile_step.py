"""Where a training step's time goes: torch.profiler over the stacked finetuning steps of one method, the
operators with the most self time first, against the wall time per step and the step's matmul floor.

    python bench/profile_step.py [--experiment mlp|transformer] [--method lora_r8] [--seeds 2] [--lrs 6]
                                 [--steps 60] [--device cpu|cuda] [--threads N]

The default is a search job: every learning rate of the grid on 2 tuning seeds, 12 models; --seeds 5 --lrs 1 is
a sweep job. The step is the project's own (experiments/mnist/experiment.finetune on the first
steps * batch_size training images of task B, one epoch).
"""

import argparse
import dataclasses
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import table  # first: puts the repo on sys.path
from experiments.methods import resolve_device
from experiments.mnist import experiment as mnist
from experiments.mnist.config import Config
from experiments.mnist.tasks import load_tasks


def truncated_tasks(cfg: Config, device: torch.device, n_train: int) -> dict:
    """Task B's first n_train training images, and one batch of each evaluation split: the steps, not the
    evaluations, are what is profiled."""
    tasks = load_tasks(cfg, device)
    cut = lambda split, n: (split[0][:n], split[1][:n])
    return {t: {"train": cut(tasks[t]["train"], n_train), "val": cut(tasks[t]["val"], cfg.batch_size),
                "test": cut(tasks[t]["test"], cfg.batch_size)} for t in tasks}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", choices=("mlp", "transformer"), default="mlp")
    p.add_argument("--method", default="lora_r8", help="a method name of the experiment's config")
    p.add_argument("--seeds", type=int, default=2, help="seeds trained together: 2 in a search job, 5 in a sweep")
    p.add_argument("--lrs", type=int, default=6, help="learning rates of each seed: the grid's first n (6: all)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")
    cfg = dataclasses.replace(Config.default(args.experiment), finetune_epochs=1)
    method = {m.name: m for m in cfg.methods}[args.method]
    tasks = truncated_tasks(cfg, device, args.steps * cfg.batch_size)
    seeds, models = list(range(args.seeds)), args.seeds * args.lrs
    base = mnist.pretrain(dataclasses.replace(cfg, pretrain_epochs=1), tasks, seeds)["params"]
    run = lambda: mnist.finetune(cfg, tasks, seeds, base, method, cfg.lr_grid[:args.lrs], test=False)
    run()  # warm-up: allocations, vmap's first trace
    start = time.perf_counter()
    run()
    per_step = (time.perf_counter() - start) / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    events = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [[e.key, e.count // args.steps, f"{e.self_cpu_time_total / args.steps / 1e3:.3f}",
             f"{100 * e.self_cpu_time_total / total:.1f}%"] for e in events[:args.rows]]
    print(table(["operator", "calls per step", "self ms per step", "share"], rows))
    # the floor: one model's matmul FLOPs per step, times the models, at this machine's best matmul rate
    model = mnist.make_model(cfg.model, cfg.dropout)
    if method.kind == "lora":
        mnist.add_adapter(model, method)
    x, y = tasks["B"]["train"][0][:cfg.batch_size].cpu(), tasks["B"]["train"][1][:cfg.batch_size].cpu()
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    flops = counter.get_total_flops() * models
    a = torch.randn(1024, 1024, device=device)
    a @ a
    t = time.perf_counter()
    for _ in range(20):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = 20 * 2 * 1024**3 / (time.perf_counter() - t)
    print(f"\n{args.experiment} {args.method}, {models} models, {torch.get_num_threads()} threads: "
          f"{per_step * 1e3:.2f} ms per step (wall); profiled op self time {total / args.steps / 1e3:.2f} ms per "
          f"step; matmul floor {flops / rate * 1e3:.2f} ms per step ({flops / 1e9:.3f} GFLOP at "
          f"{rate / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()

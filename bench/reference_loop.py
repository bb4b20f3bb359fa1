"""Question 2: the default protocol done by a plain loop (one model at a time, data already on the device as
tensors, batch by batch) against the project's sweep (the seeds of a method stacked with vmap), in one run.

    python bench/reference_loop.py [--device cpu|cuda]

Same data, split, epochs, batch size, learning rates, schedule and evaluations; only the way the work is
batched differs. The accuracies are printed side by side to show that it is the same experiment.
"""

import argparse
import copy
import tempfile
import warnings

import torch
import torch.nn.functional as F

from common import ex, median, record, table, wall

import lora


def plain_fit(model, x, y, seed: int, lr: float, epochs: int, batch_size: int) -> None:
    n = len(y)
    steps = n // batch_size
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(y.device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()


@torch.no_grad()
def plain_accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def plain_sweep(cfg: ex.Config, lrs: dict, device: torch.device) -> dict[str, list[float]]:
    """Test accuracy on task B for each method and seed, one model at a time."""
    tasks = ex.load_tasks(cfg, device)
    acc = {m: [] for m in cfg.methods}
    for seed in range(cfg.seeds):
        torch.manual_seed(seed)
        base = ex.make_mlp(cfg.dropout).to(device)
        plain_fit(base, *tasks["A"]["train"], seed, cfg.pretrain_lr, cfg.pretrain_epochs, cfg.batch_size)
        for test in ("A", "B"):
            plain_accuracy(base, *tasks[test]["test"])
        for method in cfg.methods:
            model, r = copy.deepcopy(base), ex.method_rank(method)
            if r is not None:
                torch.manual_seed(seed)
                lora.add_lora(model, r=r)
                lora.mark_only_lora_as_trainable(model)
            plain_fit(model, *tasks["B"]["train"], seed, lrs[method], cfg.finetune_epochs, cfg.batch_size)
            plain_accuracy(model, *tasks["B"]["val"])
            acc[method].append(plain_accuracy(model, *tasks["B"]["test"]))
            plain_accuracy(model, *tasks["A"]["test"])
            if r is not None:
                with lora.disable_lora(model):
                    plain_accuracy(model, *tasks["A"]["test"])
    return acc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="timings of each; the median is reported")
    args = p.parse_args()
    device = ex.resolve_device(args.device)
    warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")
    cfg = ex.Config()
    lrs = ex.load_learning_rates(ex.ROOT, cfg)
    plain_times, sweep_times = [], []
    for _ in range(args.repeats):
        out = {}
        plain_times.append(wall(lambda: out.update(plain=plain_sweep(cfg, lrs, device)), device))
        with tempfile.TemporaryDirectory() as cache:
            sweep_times.append(wall(lambda: out.update(
                sweep=ex.run_sweep(cfg, lrs, device, cache_dir=cache, progress=False)), device))
    plain, sweep = median(plain_times), median(sweep_times)
    mean = lambda xs: sum(xs) / len(xs)
    acc = out["sweep"].groupby("method", sort=False)["acc_B"].mean()
    rows = [[m, f"{mean(out['plain'][m]):.4f}", f"{acc[m]:.4f}"] for m in cfg.methods]
    body = (table(["", "plain loop", "project sweep", "speed-up"],
                  [["wall time (s), median of " + str(args.repeats), f"{plain:.1f}", f"{sweep:.1f}",
                    f"**{plain / sweep:.2f}x**"]])
            + "\n\nSame protocol, test accuracy on 5-9 (mean of " + str(cfg.seeds) + " seeds; dropout masks differ):\n\n"
            + table(["method", "plain loop", "project sweep"], rows))
    record("2. Plain reference loop against the project's sweep", body, device)


if __name__ == "__main__":
    main()

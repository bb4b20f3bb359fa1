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

from common import default_learning_rates, median, record, table, wall  # first: puts the repo on sys.path
import lora
from experiments import protocol
from experiments.methods import resolve_device
from experiments.mnist.config import Config
from experiments.mnist.experiment import MnistExperiment
from experiments.mnist.models import add_adapter, make_mlp
from experiments.mnist.tasks import load_tasks
from experiments.plain_loop import plain_accuracy, plain_fit


def plain_sweep(cfg: Config, lrs: dict, device: torch.device) -> dict[str, list[float]]:
    """Test accuracy on task B for each method and seed, one model at a time."""
    tasks = load_tasks(cfg, device)
    acc = {m.name: [] for m in cfg.methods}
    for seed in range(cfg.seeds):
        torch.manual_seed(seed)
        base = make_mlp(cfg.dropout).to(device)
        plain_fit(base, *tasks["A"]["train"], seed, cfg.pretrain_lr, cfg.pretrain_epochs, cfg.batch_size)
        for test in ("A", "B"):
            plain_accuracy(base, *tasks[test]["test"])
        for method in cfg.methods:
            model = copy.deepcopy(base)
            if method.kind == "lora":
                torch.manual_seed(seed)
                add_adapter(model, method)  # DoRA's magnitude starts at the row norms of this seed's pretrained W
            plain_fit(model, *tasks["B"]["train"], seed, lrs[method.name], cfg.finetune_epochs, cfg.batch_size)
            plain_accuracy(model, *tasks["B"]["val"])
            acc[method.name].append(plain_accuracy(model, *tasks["B"]["test"]))
            plain_accuracy(model, *tasks["A"]["test"])
            if method.kind == "lora":
                with lora.disable_lora(model):
                    plain_accuracy(model, *tasks["A"]["test"])
    return acc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="timings of each; the median is reported")
    args = p.parse_args()
    device = resolve_device(args.device)
    warnings.filterwarnings("ignore", message=r"r=\d+ exceeds")
    cfg = Config()
    lrs = default_learning_rates(cfg)
    plain_times, sweep_times = [], []
    for _ in range(args.repeats):
        out = {}
        plain_times.append(wall(lambda: out.update(plain=plain_sweep(cfg, lrs, device)), device))
        with tempfile.TemporaryDirectory() as cache:
            sweep_times.append(wall(lambda: out.update(
                sweep=protocol.sweep(MnistExperiment(cfg, device), lrs, cache, progress=False)), device))
    plain, sweep = median(plain_times), median(sweep_times)
    mean = lambda xs: sum(xs) / len(xs)
    acc = out["sweep"].groupby("method", sort=False)["acc_B"].mean()
    rows = [[m, f"{mean(out['plain'][m]):.4f}", f"{acc[m]:.4f}"] for m in (m.name for m in cfg.methods)]
    body = (table(["", "plain loop", "project sweep", "speed-up"],
                  [["wall time (s), median of " + str(args.repeats), f"{plain:.1f}", f"{sweep:.1f}",
                    f"**{plain / sweep:.2f}x**"]])
            + "\n\nSame protocol, test accuracy on 5-9 (mean of " + str(cfg.seeds) + " seeds; dropout masks differ):\n\n"
            + table(["method", "plain loop", "project sweep"], rows))
    record("2. Plain reference loop against the project's sweep", body, device)


if __name__ == "__main__":
    main()

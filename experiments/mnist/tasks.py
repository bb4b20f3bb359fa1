"""MNIST as the two tasks of the experiments: task A = digits 0-4, task B = digits 5-9 relabelled 0-4."""

import functools

import torch
from torchvision.datasets import MNIST

from . import data

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics

Split = tuple[torch.Tensor, torch.Tensor]  # x (N, 784) float32, y (N,) int64


def split_indices(n: int, val_size: int, split_seed: int, train_subset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into the 60k training images: a seeded permutation, validation first."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return (train_idx if train_subset is None else train_idx[:train_subset]), val_idx


def load_tasks(cfg, device: torch.device) -> dict[str, dict[str, Split]]:
    """{"A"|"B": {"train"|"val"|"test": (x, y)}}, resident on `device`, normalised with MNIST's mean and std.
    Loaded once per process for each split of the data: the tensors are shared, and never written to."""
    return _load_tasks(cfg.val_size, cfg.split_seed, cfg.train_subset, torch.device(device))


@functools.lru_cache(maxsize=4)
def _load_tasks(val_size: int, split_seed: int, train_subset: int | None, device: torch.device) -> dict:
    root = data.prepare_mnist()
    train, test = MNIST(root, train=True), MNIST(root, train=False)
    train_idx, val_idx = split_indices(len(train.targets), val_size, split_seed, train_subset)
    splits = {"train": (train.data[train_idx], train.targets[train_idx]),
              "val": (train.data[val_idx], train.targets[val_idx]),
              "test": (test.data, test.targets)}
    tasks = {"A": {}, "B": {}}
    for name, (images, labels) in splits.items():
        x = ((images.float() / 255 - MEAN) / STD).flatten(1)  # (N, 28, 28) uint8 -> (N, 784)
        for task, lo in (("A", 0), ("B", 5)):
            keep = (labels >= lo) & (labels < lo + 5)
            tasks[task][name] = (x[keep].to(device), (labels[keep] - lo).to(device))
    return tasks

"""One model at a time, batch by batch: the plainest training loop, an independent reference for the stacked
trainer (tests/test_trainer.py) and the baseline of bench/reference_loop.py."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def plain_fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, lr: float, epochs: int,
              batch_size: int) -> list[float]:
    """Adam with a cosine schedule over the trainable parameters; the same data order as trainer.fit for
    `seed`. Returns the training loss of every step."""
    n = len(y)
    steps = n // batch_size  # the last partial batch is dropped
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(y.device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])  # (B, 784) -> (B, 5) logits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.detach())  # kept on the device: no sync per step
    return torch.stack(losses).tolist()


@torch.no_grad()
def plain_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()

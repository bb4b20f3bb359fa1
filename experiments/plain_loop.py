"""One model at a time, batch by batch: the plainest training loop. The text runs train with it, the tests use it
as an independent reference for the stacked trainer, and bench/reference_loop.py as the baseline."""

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .trainer import MAX_GRAD_NORM, lr_factor

Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # what the model takes: x, or (input_ids, attention_mask), ...


def select_rows(x: Inputs, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows `idx` of every input tensor."""
    return tuple(t[idx] for t in (x if isinstance(x, tuple) else (x,)))


def plain_fit(model: nn.Module, x: Inputs, y: torch.Tensor, seed: int, lr: float, epochs: int, batch_size: int,
              select: Callable[[Inputs, torch.Tensor], tuple[torch.Tensor, ...]] = select_rows,
              amp_dtype: torch.dtype | None = None, fused: bool = False, linear_decay: bool = False) -> list[float]:
    """Adam over the trainable parameters, with trainer.fit's schedule (linear warmup, then cosine) and gradient
    clipping at MAX_GRAD_NORM, written with torch's own pieces (LambdaLR, clip_grad_norm_); the same data order as trainer.fit for `seed`
    (the last partial batch is dropped). Returns the training loss of every step.

    select(x, idx): a batch's inputs (default: the rows idx of each tensor; the text runs also trim padding).
    amp_dtype: autocast the forward pass to it (bf16 on a GPU); weights and Adam's state stay float32.
    fused: torch's fused Adam kernel. linear_decay: after warmup, a straight line to 0 (trainer.lr_factor's).
    """
    n = len(y)
    steps = n // batch_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr, fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, epochs * steps,
                                                                             linear_decay=linear_decay))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(y.device)
        for i in range(steps):
            idx = order[i * batch_size:(i + 1) * batch_size]
            with torch.autocast(y.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(*select(x, idx))  # (B, classes)
            if amp_dtype is not None:
                logits = logits.float()  # the loss in float32, not in the autocast dtype
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            opt.step()
            schedule.step()
            losses.append(loss.detach())  # kept on the device: no sync per step
    return torch.stack(losses).tolist()


@torch.no_grad()
def plain_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()

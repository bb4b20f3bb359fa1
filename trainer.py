"""The stacked trainer: the seeds of one method train together as one model.

torch.func.vmap over functional_call runs every seed's copy of the model at once, with parameters of shape
(seeds, ...). Adam is elementwise and the losses of different seeds do not interact, so this is exactly
len(seeds) separate trainings, done in one pass per batch instead of one pass per seed
(tests/test_trainer.py checks it against the plain loop of plain_loop.py).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def stack(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict of (seeds, ...) tensors from one state dict per seed."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def forward(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run every seed's copy of `model`: params (S, ...) each, x (S, B, 784) per seed or (B, 784) shared.

    Returns logits (S, B, 5). Dropout draws independent masks for each seed.
    """
    call = lambda p, x: torch.func.functional_call(model, p, (x,))
    return torch.vmap(call, in_dims=(0, 0 if x.dim() == 3 else None), randomness="different")(params, x)


@torch.no_grad()
def accuracy(model: nn.Module, params: dict[str, torch.Tensor], split: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
    """Accuracy of each seed's model on (x, y), in eval mode."""
    x, y = split
    was_training = model.training
    model.eval()
    correct = (forward(model, params, x).argmax(-1) == y).float().mean(-1)  # (S, N) -> (S,)
    model.train(was_training)
    return correct.tolist()


def fit(model: nn.Module, params: dict[str, torch.Tensor], split: tuple[torch.Tensor, torch.Tensor],
        seeds: list[int], lr: float, epochs: int, batch_size: int) -> list[float]:
    """Train the parameters that require grad in place with Adam and a cosine schedule; returns the mean
    training loss of each epoch (averaged over seeds).

    Each seed shuffles with its own generator, so every method sees the same data order for a given seed.
    """
    x, y = split
    n, S = len(y), len(seeds)
    steps_per_epoch = n // batch_size  # the last partial batch is dropped
    trainable = [p for p in params.values() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr, fused=True)  # one kernel for all tensors instead of ~10 each
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(y.device)  # (S, N)
        total = torch.zeros((), device=y.device)
        for i in range(steps_per_epoch):
            idx = order[:, i * batch_size:(i + 1) * batch_size]  # (S, B)
            xb = x.index_select(0, idx.flatten()).view(S, batch_size, -1)  # (S, B, 784); 2x faster than x[idx]
            logits = forward(model, params, xb)  # (S, B, 784) -> (S, B, 5)
            # mean over each seed's batch, summed over seeds: each seed gets exactly its own gradient
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten()) * S
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.detach()
        losses.append(total.item() / (steps_per_epoch * S))
    return losses

"""The stacked trainer: many models of one architecture train together as one.

torch.func.vmap over functional_call runs every model's copy at once, with parameters of shape (S, ...): the
seeds of one method, and during the learning-rate search every (learning rate, seed) pair of the grid. Adam is
elementwise and the models' losses do not interact, so this is exactly S separate trainings, each at its own
learning rate, done in one pass per batch instead of S (tests/test_trainer.py checks it against the plain loop
of plain_loop.py). On CUDA the whole training step is captured once in a CUDA graph and replayed, so a step
costs one launch instead of hundreds.
"""

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


EVAL_CHUNK = 128  # examples per evaluation forward on the CPU (bench/README.md, "Where the time goes")
WARMUP = 0.06        # share of the steps over which the learning rate rises linearly (LoRA paper, Appendix D)
MAX_GRAD_NORM = 1.0  # each model's gradient norm is clipped to this (Hugging Face Trainer's default)


def warmup_steps(total_steps: int, warmup: float = WARMUP) -> int:
    """Steps of linear warmup: a share `warmup` of the run, at least one (the first step is then at full lr)."""
    return max(1, math.ceil(warmup * total_steps))


def lr_factor(step: int, total_steps: int, warmup: float = WARMUP, linear_decay: bool = False) -> float:
    """The schedule's multiplier of the learning rate at step `step` (0-based): (step + 1) / W for the first W
    warmup steps (so the first step already moves), then a cosine from 1 down towards 0 over the rest (or, with
    linear_decay, a straight line from 1 to 0, as Hugging Face's get_linear_schedule_with_warmup)."""
    w = warmup_steps(total_steps, warmup)
    if step < w:
        return (step + 1) / w
    if linear_decay:
        return 1 - (step - w) / max(1, total_steps - w)
    return (1 + math.cos(math.pi * (step - w) / max(1, total_steps - w))) / 2


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)


def stack(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One dict of (S, ...) tensors from one state dict per model."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def forward(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
            frozen: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run every stacked copy of `model`: params (S, ...) each, x (G, B, 784) per seed or (B, 784) shared.
    Returns logits (S, B, 5). Dropout draws independent masks for each model.

    frozen: tensors (G, ...) of one model per seed, shared by the S = L * G models (learning-rate major: model
    l * G + g is seed g at learning rate l). A nested vmap, over seeds and then over learning rates, computes
    what depends on them alone once per seed, not once per model: the frozen W x of LoRA's first layer, say.
    Without frozen, G = S: x is (S, B, 784).
    """
    call = lambda p, x: torch.func.functional_call(model, p, (x,))
    x_dim = 0 if x.dim() == 3 else None
    if not frozen:
        return torch.vmap(call, in_dims=(0, x_dim), randomness="different")(params, x)
    G = len(next(iter(frozen.values())))
    per_model = {k: v.view(-1, G, *v.shape[1:]) for k, v in params.items()}  # (S, ...) -> (L, G, ...)
    over_lrs = torch.vmap(lambda p, f, x: call({**p, **f}, x), in_dims=(0, None, None), randomness="different")
    over_seeds = torch.vmap(over_lrs, in_dims=(1, 0, x_dim), out_dims=1, randomness="different")
    return over_seeds(per_model, frozen, x).flatten(0, 1)  # (L, G, B, 5) -> (S, B, 5)


@torch.no_grad()
def correct(model: nn.Module, params: dict[str, torch.Tensor], split: tuple[torch.Tensor, torch.Tensor],
            frozen: dict[str, torch.Tensor] | None = None, chunk: int | None = None) -> torch.Tensor:
    """Which examples of (x, y) each stacked model classifies right, (S, N) bool, in eval mode, `chunk` examples
    at a time (default: EVAL_CHUNK on the CPU, where a whole split at once makes activations of hundreds of MB
    for stacked transformers, far slower than chunks that stay in cache; the whole split on CUDA, where every
    chunk costs launches)."""
    x, y = split
    chunk = chunk or (EVAL_CHUNK if x.device.type == "cpu" else len(y))
    was_training = model.training
    model.eval()
    right = torch.cat([forward(model, params, x[i:i + chunk], frozen).argmax(-1) == y[i:i + chunk]
                       for i in range(0, len(y), chunk)], dim=1)  # (S, N)
    model.train(was_training)
    return right


def accuracy(model: nn.Module, params: dict[str, torch.Tensor], split: tuple[torch.Tensor, torch.Tensor],
             frozen: dict[str, torch.Tensor] | None = None, chunk: int | None = None) -> list[float]:
    """Accuracy of each stacked model on (x, y): the share of `correct`."""
    return correct(model, params, split, frozen, chunk).float().mean(-1).tolist()


class CosineAdam:
    """Adam (torch.optim.Adam's update and defaults) with per-model gradient clipping and a learning rate that
    warms up linearly, then anneals on a cosine (lr_factor), for each stacked model.

    lrs (S,) scales model s's update alone, and model s's gradient is clipped by its own norm over all its
    trainable tensors (torch.nn.utils.clip_grad_norm_'s rule), so stacking stays exact. The step count and the
    schedule live in tensors on the parameters' device, so a CUDA graph can replay `step` unchanged.
    linear_decay: after warmup, down to 0 on a straight line instead of the cosine (lr_factor's).
    """

    def __init__(self, params: list[torch.Tensor], lrs: list[float], total_steps: int,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, warmup: float = WARMUP,
                 max_grad_norm: float | None = MAX_GRAD_NORM, linear_decay: bool = False):
        device = params[0].device
        self.params, self.total_steps, self.betas, self.eps = params, total_steps, betas, eps
        self.linear_decay = linear_decay
        self.warmup, self.max_grad_norm = warmup_steps(total_steps, warmup), max_grad_norm
        self.lrs = torch.tensor(lrs, dtype=torch.float64, device=device)  # (S,)
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = torch.zeros((), dtype=torch.float64, device=device)  # steps taken

    def clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each model's gradient scaled by min(1, max_grad_norm / (its norm + 1e-6)), as clip_grad_norm_ does."""
        if self.max_grad_norm is None:
            return grads
        norm = sum(g.pow(2).flatten(1).sum(1) for g in grads).sqrt()  # (S,): over every tensor of model s
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * coef.view(-1, *[1] * (g.dim() - 1)) for g in grads]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        b1, b2 = self.betas
        w, t = self.warmup, self.t
        if self.linear_decay:
            decay = 1 - (t - w) / max(1, self.total_steps - w)
        else:  # written as before linear_decay existed, so that the cosine rounds as it did
            decay = (1 + torch.cos(math.pi * (t - w) / max(1, self.total_steps - w))) / 2
        lr = self.lrs * torch.where(t < w, (t + 1) / w, decay)  # this step's lr per model (S,): lr_factor
        self.t += 1
        step_size = lr / (1 - b1 ** self.t)  # (S,), float64 like torch.optim.Adam's Python floats
        root_bc2 = (1 - b2 ** self.t).sqrt()
        for p, g, m, v in zip(self.params, self.clip(grads), self.m, self.v):
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            # the step in the weights' dtype: float32 for float32 weights, float64 for the tests' float64 ones
            denom = (v.sqrt() / root_bc2.to(p.dtype)).add_(self.eps)
            p.sub_(step_size.to(p.dtype).view(-1, *[1] * (p.dim() - 1)) * m / denom)  # (S, 1, ..) * (S, ...)


def fit(model: nn.Module, params: dict[str, torch.Tensor], split: tuple[torch.Tensor, torch.Tensor],
        seeds: list[int], lrs: list[float], epochs: int, batch_size: int, graph: bool | None = None,
        stacked_forward: Callable[[dict, torch.Tensor], torch.Tensor] | None = None,
        frozen: dict[str, torch.Tensor] | None = None, linear_decay: bool = False,
        after_epoch: Callable[[int], None] | None = None) -> list[list[float]]:
    """Train the parameters that require grad in place, model s with Adam at lrs[s] (warmup, then cosine; each
    model's gradient norm clipped: CosineAdam); returns each model's mean training loss per epoch, (S, epochs).

    Model s shuffles with a generator seeded by seeds[s], so every method (and every learning rate) sees the
    same data order for a given seed. graph: capture the step in a CUDA graph (default: on CUDA).
    stacked_forward(params, xb): logits (S, B, classes) of a model written for stacked parameters, used instead
    of vmap over `model` (whose train() is still called). frozen: the tensors (G, ...) that the models of one
    seed share (see `forward`); seeds are then G seeds repeated, learning-rate major, and each seed's batch is
    gathered once. linear_decay: CosineAdam's. after_epoch(e) runs after epoch e (0-based), outside any CUDA
    graph: where a caller scores every epoch of one run (the schedule never depends on it).
    """
    x, y = split
    n, S = len(y), len(seeds)
    if len(lrs) != S:
        raise ValueError(f"one learning rate per stacked model: {S} seeds but {len(lrs)} learning rates")
    G = len(next(iter(frozen.values()))) if frozen else S  # distinct seeds: distinct data orders
    if S % G or seeds != seeds[:G] * (S // G):
        raise ValueError(f"with frozen tensors of {G} seeds, seeds must be {G} seeds repeated; got {seeds}")
    steps_per_epoch = n // batch_size  # the last partial batch is dropped
    trainable = [p for p in params.values() if p.requires_grad]
    opt = CosineAdam(trainable, lrs, total_steps=epochs * steps_per_epoch, linear_decay=linear_decay)
    idx = torch.zeros(G, batch_size, dtype=torch.long, device=y.device)  # this step's batch (G, B), filled in place

    def step() -> torch.Tensor:
        xb = x.index_select(0, idx.flatten()).view(G, batch_size, -1)  # (G, B, 784); 2x faster than x[idx]
        yb = y.index_select(0, idx.flatten()).repeat(S // G)  # (S * B,): model s's labels
        logits = forward(model, params, xb, frozen) if stacked_forward is None else stacked_forward(params, xb)
        loss = F.cross_entropy(logits.flatten(0, 1), yb, reduction="none")  # (S, B, 5) -> (S * B,)
        per_model = loss.view(S, batch_size).mean(1)  # (S,): each model's batch mean
        opt.step(torch.autograd.grad(per_model.sum(), trainable))  # the sum: model s gets its own gradient
        return per_model.detach()

    gens = [torch.Generator().manual_seed(s) for s in seeds[:G]]
    model.train()
    use_graph = y.device.type == "cuda" if graph is None else graph
    run = step
    losses = torch.zeros(epochs, S, device=y.device)  # summed on the device: no sync per step
    for e in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(y.device)  # (G, N)
        for i in range(steps_per_epoch):
            idx.copy_(order[:, i * batch_size:(i + 1) * batch_size])
            if use_graph and e * steps_per_epoch + i == 3:  # after 3 eager steps have settled the allocations
                run = capture(step, y.device)
            losses[e] += run()
        if after_epoch is not None:
            after_epoch(e)
            model.train()
    return (losses / steps_per_epoch).T.tolist()


def capture(step, device: torch.device):
    """`step` replayed from a CUDA graph, or `step` itself, with one warning, where it cannot be captured.
    Capturing records the step without running it, so no training step is lost or run twice either way."""
    try:
        if device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, the data is on {device}")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = step()
    except Exception as e:  # an op that syncs, a device that cannot capture: run eagerly
        warnings.warn(f"training step not captured in a CUDA graph, running eagerly: {e}", RuntimeWarning, stacklevel=3)
        return step

    def replay() -> torch.Tensor:
        g.replay()
        return out  # overwritten by the next replay, after the caller has added it up
    return replay

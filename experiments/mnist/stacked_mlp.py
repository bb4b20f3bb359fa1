"""The MLP's forward for stacked models, written out: the training step of the MLP experiment on the CPU.

vmap over lora.py's layers (trainer.forward) is exact but lays LoRA's small matrices out badly on the CPU: it
copies each seed's batch once per learning rate, multiplies by each model's A (r, 784) separately, and takes
A's gradient as the slow (784, B) @ (B, r) product, a large part of a search step's time (bench/README.md,
"Where the time goes"). Here the L models of one seed multiply their shared input by all their A at once,
(B, 784) @ (784, L r), and that input's frozen W x is computed once per seed. The arithmetic is lora.py's:
h = W x + b + s B A x, DoRA's m ⊙ (W x + s B A x) / ‖W + s B A‖ + b with the norm detached as in lora.py, and
tests/test_stacked_mlp.py checks outputs and gradients against vmap over lora.py's layers.
"""

import torch
import torch.nn.functional as F

LAYERS = ("0", "3", "6")  # make_mlp's nn.Linear layers: 784 -> 64 -> 64 -> 5, ReLU and dropout between


def forward(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], x: torch.Tensor, scaling: float,
            dropout: float, training: bool) -> torch.Tensor:
    """Logits (S, B, 5) of S = L * G models, learning-rate major: x (G, B, 784) per seed, params (S, ...) per
    model, frozen (G, ...) per seed. make_mlp's parameter names, with or without LoRA or DoRA."""
    G = len(x)

    def get(name: str) -> torch.Tensor | None:  # (L, G, ...) per model, (G, ...) per seed, None if absent
        if name in params:
            return params[name].view(-1, G, *params[name].shape[1:])
        return frozen.get(name)

    h = x  # (G, B, in) while it is the same for every learning rate, then (L, G, B, in)
    for i, layer in enumerate(LAYERS):
        W, b, A, B, m = (get(f"{layer}.{n}") for n in ("weight", "bias", "lora_A", "lora_B", "lora_magnitude"))
        h = linear(h, W, b, A, B, m, scaling)
        if i < len(LAYERS) - 1:
            h = F.relu(h)
            if training and dropout > 0:  # one uniform draw per element: cheaper on the CPU than bernoulli_
                h = h * (torch.rand_like(h) >= dropout) / (1 - dropout)
    return h.flatten(0, 1) if h.dim() == 4 else h  # (L, G, B, 5) -> (S, B, 5)


def linear(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None,
           m: torch.Tensor | None, s: float) -> torch.Tensor:
    """One layer for every model. h (G, B, in) shared by the L models of a seed, or (L, G, B, in); W, b per seed
    (G, ...) when frozen, per model (L, G, ...) when trained; A (L, G, r, in), B (L, G, out, r), m (L, G, out)."""
    shared = h.dim() == 3
    Wt = W.transpose(-1, -2)  # (.., in, out)
    if A is None:  # no adapter: every weight of this layer trains (full finetuning), or none does
        return torch.matmul(h, Wt) + b.unsqueeze(-2)  # (.., B, in) @ (.., in, out), broadcast over L
    L, G, r, n_in = A.shape
    wx = torch.matmul(h, Wt)  # frozen W x: (G, B, out) once per seed when h is shared, else (L, G, B, out)
    if shared:  # every learning rate's A at once: (G, B, in) @ (G, in, L r) -> (G, B, L, r) -> (L, G, B, r)
        u = torch.bmm(h, A.permute(1, 3, 0, 2).reshape(G, n_in, L * r)).view(G, -1, L, r).permute(2, 0, 1, 3)
    else:
        u = torch.matmul(h, A.transpose(-1, -2))  # (L, G, B, in) @ (L, G, in, r) -> (L, G, B, r)
    v = wx + s * torch.matmul(u, B.transpose(-1, -2))  # W x + s B A x: (L, G, B, out)
    if m is None:
        return v + b.unsqueeze(-2)
    with torch.no_grad():  # ‖W + s B A‖ per row, detached as lora.py's weight_norm is (DoRA, section 4.3)
        norm = torch.linalg.vector_norm(W + s * (B @ A), dim=-1)  # (L, G, out, in) -> (L, G, out)
    return v * (m / norm).unsqueeze(-2) + b.unsqueeze(-2)

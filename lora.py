"""
LoRA for nn.Linear, in one file that imports only torch: copy it into your project and use it.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pretrained weight W and learns a low-rank update beside it:

    h = W x + (alpha / r) · B A x           W: (out, in) frozen,  A: (r, in),  B: (out, r)

        x ──► W ─────────────────────────────┐
        │                                    + ──► h
        └──► dropout ──► A ──► B ──► · alpha/r

- Initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear initialises
  its own weight and as PEFT and loralib do; B = 0. So B A = 0 and training starts exactly at the base model.
  ("gaussian": A ~ N(0, std=1/r), as PEFT's "gaussian".)
- Scaling: alpha / r. With alpha held fixed while r varies, dividing by r keeps the size of the update roughly
  independent of r under Adam, so one learning rate serves every rank (paper, section 4.1). alpha defaults to
  r (scaling 1): then each rank wants its own learning rate, as in this repo's experiments, which tune it.
  use_rslora=True scales by alpha / sqrt(r) instead (Kalajdzievski, 2023, arXiv:2312.03732).
- The wrapped layer keeps the base's parameter names: `<path>.weight` and `<path>.bias` are the base's own
  tensors (not copies), so a checkpoint saved before add_lora loads after it; the adapter adds
  `<path>.lora_A` and `<path>.lora_B`.

    import lora
    names = lora.add_lora(model, r=8, targets=["query", "value"])
    lora.mark_only_lora_as_trainable(model)
    ...train...
    torch.save(lora.lora_state_dict(model), "adapter.pt")
    model = lora.merge_lora(model)          # plain nn.Linear layers again, for deployment
"""

import contextlib
import fnmatch
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("kaiming", "gaussian")
BIAS_MODES = ("none", "all", "lora_only")


def _check_hparams(r, alpha, dropout, init, use_rslora) -> None:
    """Raise before anything is built, naming the value given and what is accepted."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ValueError(f"alpha must be a positive finite number or None (meaning alpha = r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")


def _check_base(base: nn.Module, name: str = "base") -> None:
    if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already carries LoRA; wrapping it again would stack a second adapter "
                         "(was add_lora run twice, e.g. by re-running a notebook cell?)")
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(base).__name__}")


class LoRALinear(nn.Module):
    """nn.Linear with a frozen weight plus a trainable low-rank update (alpha / r) · B A."""

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False):
        super().__init__()
        _check_base(base)
        _check_hparams(r, alpha, dropout, init, use_rslora)
        out_features, in_features = base.weight.shape
        if r > min(in_features, out_features):
            warnings.warn(f"r={r} exceeds min(in_features, out_features) = min({in_features}, {out_features}): "
                          f"the update B A has rank at most {min(in_features, out_features)}, so the extra "
                          "parameters add no expressiveness", stacklevel=2)
        self.r = int(r)
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.dropout = float(dropout)
        self.enabled = True  # False inside disable_lora(): the layer computes the base output only

        # The base's own Parameters, not copies: same names in state_dict, no extra memory.
        self.weight = base.weight  # (out, in)
        self.bias = base.bias      # (out,) or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.r, **factory))  # (out, r)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan_in = in: U(-1/sqrt(in), 1/sqrt(in))
        else:
            nn.init.normal_(self.lora_A, std=1 / self.r)
        # W as it was before merge(), so unmerge() and disable_lora() are exact. Not saved in state_dict.
        self.register_buffer("weight_before_merge", None, persistent=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def merged(self) -> bool:
        return self.weight_before_merge is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out), one matmul
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if self.dropout > 0:
            x2_drop = F.dropout(x2, self.dropout, self.training)
        else:
            x2_drop = x2  # p = 0: no copy of x
        # In place below is safe: linear's backward needs its inputs, never its output.
        u = F.linear(x2_drop, self.lora_A).mul_(self.scaling)  # (N, in) @ (in, r) -> (N, r), scaled while small
        v = F.linear(u, self.lora_B, self.bias)  # (N, r) @ (r, out) + bias -> (N, out)
        # v + x Wᵀ: the big GEMM adds v while it writes its output, so there is no extra pass over (N, out).
        # (Out of place: addmm_ would save a copy of v on the GPU, but vmap has no fast rule for it.)
        return torch.addmm(v, x2, self.weight.t()).view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, the (out, in) update that merge() adds to W, in W's dtype."""
        return self._delta_weight_fp32().to(self.weight.dtype)

    def _delta_weight_fp32(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, r) @ (r, in) -> (out, in)

    def merged_weight(self) -> torch.Tensor:
        """W + scaling · B A, summed in float32 and cast to W's dtype; ValueError if not finite."""
        w0 = self.weight if not self.merged else self.weight_before_merge
        merged = (w0.float() + self._delta_weight_fp32()).to(self.weight.dtype)  # checked after the cast:
        if not torch.isfinite(merged).all():                                    # float16 overflows at 65504
            raise ValueError(f"merging would put NaN or Inf into the {self.weight.dtype} weight; lora_A or lora_B "
                             f"has diverged (|A|max={self.lora_A.abs().max().item():g}, "
                             f"|B|max={self.lora_B.abs().max().item():g})")
        return merged

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W, so forward is one matmul. A no-op if already merged."""
        if self.merged:
            return
        merged = self.merged_weight()  # raises before anything changes
        self.weight_before_merge = self.weight.detach().clone()
        self.weight.copy_(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W exactly as it was before merge(). A no-op if not merged."""
        if not self.merged:
            return
        self.weight.copy_(self.weight_before_merge)
        self.weight_before_merge = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, layer) for every LoRALinear in the model, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.rsplit(".", 1)[-1] == pattern or fnmatch.fnmatchcase(name, pattern)


def add_lora(model: nn.Module, r: int, alpha: float | None = None, targets: str | Iterable[str] | None = None,
             dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False) -> list[str]:
    """Wrap in place every nn.Linear whose name matches `targets`; return the wrapped names in module order.

    Args:
        targets: None for every nn.Linear; else a name or list of names, each an exact qualified name
            ("encoder.0.query"), a last name component ("query") or a glob ("layers.*.attn.q_proj").
            Every target must match something, and everything it matches must be an nn.Linear.
    """
    _check_hparams(r, alpha, dropout, init, use_rslora)
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRALinear) for m in modules.values()) and targets is None:
        raise ValueError("model already carries LoRA layers; add_lora(targets=None) would stack a second adapter "
                         f"on them: {[n for n, _ in lora_layers(model)]}")
    if targets is None:
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not names:
            raise ValueError(f"model has no nn.Linear to wrap ({type(model).__name__})")
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"targets must be None, a non-empty name, or a non-empty list of them, got {targets!r}")
        linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, LoRALinear))]
        matched = set()
        for p in patterns:
            hits = [n for n in modules if n and _matches(n, p)]
            if not hits:
                raise ValueError(f"target {p!r} matches no module; the nn.Linear layers are: {linears}")
            for n in hits:
                _check_base(modules[n], name=f"module {n!r} (matched by target {p!r})")
            matched.update(hits)
        names = [n for n in modules if n in matched]  # module order
    for n in names:
        _check_base(modules[n], name=f"module {n!r}")
        if isinstance(modules[n.rpartition(".")[0]], nn.MultiheadAttention):
            raise TypeError(f"module {n!r} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                            "directly and would silently ignore the adapter; target other layers")
    for n in names:  # all checks passed: now change the model
        _set_submodule(model, n, LoRALinear(modules[n], r, alpha, dropout, init, use_rslora))
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except lora_A and lora_B (and biases: "all" of them, or "lora_only")."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or
                         (bias == "all" and name.rsplit(".", 1)[-1] == "bias"))
    if bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter only: every `<path>.lora_A` and `<path>.lora_B`, a few KB to MB instead of the whole model."""
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors into a model wrapped the same way; checks every key and shape before copying."""
    own = lora_state_dict(model)
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    if missing or unexpected:
        raise KeyError(f"adapter state_dict does not fit this model: missing keys {missing}, unexpected keys "
                       f"{unexpected} (was add_lora called with the same targets?)")
    for k, v in state_dict.items():
        if v.shape != own[k].shape:
            raise ValueError(f"shape mismatch for {k!r}: state_dict has {tuple(v.shape)}, "
                             f"model has {tuple(own[k].shape)} (same r?)")
    if merged := [n for n, layer in lora_layers(model) if layer.merged]:
        raise RuntimeError(f"cannot load an adapter into merged layers {merged}: unmerge() them first")
    for k, v in state_dict.items():
        own[k].copy_(v)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + scaling · B A; returns the model.

    Every layer is checked before any is replaced, so a diverged adapter leaves the model as it was.
    """
    layers = list(lora_layers(model))
    for name, layer in layers:
        try:
            layer.merged_weight()
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    with torch.no_grad():
        for name, layer in layers:
            weight = layer.weight if layer.merged else layer.merged_weight()
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device="meta")  # no allocation: both parameters are replaced below
            linear.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
            linear.bias = layer.bias
            _set_submodule(model, name, linear)
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Inside: the model computes exactly the base model's output, merged or not. On exit: as before."""
    layers = [layer for _, layer in lora_layers(model)]
    state = [(layer, layer.enabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.enabled = False
        yield model
    finally:
        for layer, enabled, merged in state:
            layer.enabled = enabled
            if merged:
                layer.merge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

"""
LoRA for nn.Linear, in one file that imports only torch: copy it into your project and use it.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pretrained weight W and learns a low-rank update beside it:

    h = W x + (alpha / r) · B A x           W: (out, in) frozen,  A: (r, in),  B: (out, r)

        x ──► W ─────────────────────────────┐
        │                                    + ──► h
        └──► dropout ──► A ──► B ──► · alpha/r

- Initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear initialises
  its own weight and as PEFT and loralib do; B = 0. So B A = 0 and training starts at the base model: bit for
  bit on a CPU; on a GPU the fused addmm of forward may pick another GEMM kernel than nn.Linear does, which
  moves the output by float32 rounding (7e-7 at most for a 384 -> 384 layer on an H100).
  ("gaussian": A ~ N(0, std=1/r), as PEFT's "gaussian".)
- Scaling: alpha / r. With alpha held fixed while r varies, dividing by r keeps the size of the update roughly
  independent of r under Adam, so one learning rate serves every rank (paper, section 4.1). alpha defaults to
  r (scaling 1): then each rank wants its own learning rate, as in this repo's experiments, which tune it.
  use_rslora=True scales by alpha / sqrt(r) instead (Kalajdzievski, 2023, arXiv:2312.03732).
- DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353), use_dora=True:
  a trainable magnitude m of shape (out,), initialised to the row norms of W, sets the length of each output
  row of the adapted weight, and LoRA only turns its direction:

    h = m ⊙ (W + scaling · B A) x / ‖W + scaling · B A‖ + b      (norm over `in`, one per output feature)

  The norm is a constant in backward (paper, section 4.3), as in PEFT. At initialisation m = ‖W‖ and B = 0,
  so DoRA too starts at the base model (in half precision, up to one rounding of the output).
- The wrapped layer keeps the base's parameter names: `<path>.weight` and `<path>.bias` are the base's own
  tensors (not copies), so a checkpoint saved before add_lora loads after it; the adapter adds
  `<path>.lora_A` and `<path>.lora_B` (and `<path>.lora_magnitude` for DoRA).
- merge() folds the update into W in place, keeping no copy of W; unmerge() takes it out again, up to
  rounding (see merge). A merged layer refuses to train rather than silently train nothing.
- Hugging Face PEFT's adapter files: lora_peft.py beside this file (optional; it needs safetensors).

    import lora
    names = lora.add_lora(model, r=8, targets=["query", "value"])   # use_dora=True for DoRA
    lora.mark_only_lora_as_trainable(model)
    ...train...
    torch.save(lora.lora_state_dict(model), "adapter.pt")   # or lora_peft.save_peft_adapter(model, "adapter/")
    model = lora.merge_lora(model)          # plain nn.Linear layers again, for deployment
"""

import contextlib
import fnmatch
import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

INITS = ("kaiming", "gaussian")
BIAS_MODES = ("none", "all", "lora_only")
ADAPTER_NAMES = ("lora_A", "lora_B", "lora_magnitude")  # the trainable tensors of a LoRALinear


def _check_hparams(r, alpha, dropout, init, use_rslora, use_dora) -> None:
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
    for flag, value in (("use_rslora", use_rslora), ("use_dora", use_dora)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")


def _check_base(base: nn.Module, name: str = "base", use_dora: bool = False) -> None:
    if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already carries LoRA; wrapping it again would stack a second adapter "
                         "(was add_lora run twice, e.g. by re-running a notebook cell?)")
    if not isinstance(base, nn.Linear):
        raise TypeError(f"{name} must be an nn.Linear, got {type(base).__name__}")
    if use_dora and not base.weight.is_meta and (zero := (base.weight == 0).all(dim=1)).any():
        raise ValueError(f"{name} has all-zero rows {zero.nonzero().flatten()[:10].tolist()} in its weight; DoRA "
                         "divides each row by its norm, so use_dora=True needs every row non-zero")


class LoRALinear(nn.Module):
    """nn.Linear with a frozen weight plus a trainable low-rank update (alpha / r) · B A (DoRA: and a magnitude)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False):
        super().__init__()
        _check_hparams(r, alpha, dropout, init, use_rslora, use_dora)
        _check_base(base, use_dora=use_dora)
        out_features, in_features = base.weight.shape
        if r > min(in_features, out_features):
            warnings.warn(f"r={r} exceeds min(in_features, out_features) = min({in_features}, {out_features}): "
                          f"the update B A has rank at most {min(in_features, out_features)}, so the extra "
                          "parameters add no expressiveness", stacklevel=2)
        self.r = int(r)
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.dropout = float(dropout)
        self.enabled = True  # False inside disable_lora(): the layer computes the base output only
        self.merged = False  # True after merge(): W holds the adapted weight
        self.train(base.training)  # wrapping a model in eval mode leaves it in eval mode

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
        if use_dora:
            norms = torch.linalg.vector_norm(self.weight.detach(), dim=1, dtype=self._precise)  # (out,)
            self.lora_magnitude = nn.Parameter(norms.to(self.weight.dtype))  # m = ‖W‖: starts at the base model
        # DoRA, while merged: the norm merge() divided by, so that unmerge() can undo it. Saved only when merged.
        self.register_buffer("merged_norm", None, persistent=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def _precise(self) -> torch.dtype:
        """float32, or float64 for a float64 layer: the dtype of merges and of DoRA's norm."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """lora_A, lora_B (and DoRA's lora_magnitude): what fine-tuning trains."""
        return [self.lora_A, self.lora_B] + ([self.lora_magnitude] if self.use_dora else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_parameters()):
                raise RuntimeError("this LoRALinear is merged, so its adapter would get no gradient: call unmerge() "
                                   "before training (for inference, call eval() or use torch.no_grad())")
            return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out), one matmul
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        if self.use_dora:
            return self._dora_forward(x)
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

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """m ⊙ (W + s B A) x / ‖W + s B A‖ + b, through the same (x Aᵀ) Bᵀ as LoRA: no (out, in) matrix per step."""
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        x2_drop = F.dropout(x2, self.dropout, self.training) if self.dropout > 0 else x2
        scale = (self.lora_magnitude.to(self._precise) / self.weight_norm()).to(x.dtype)  # (out,): m / ‖W + s B A‖
        u = F.linear(x2_drop, self.lora_A).mul_(self.scaling)  # (N, in) @ (in, r) -> (N, r)
        v = torch.addmm(F.linear(u, self.lora_B), x2_drop, self.weight.t())  # (N, r)@(r, out) + (N, in)@(in, out)
        h = v * scale if self.bias is None else torch.addcmul(self.bias, v, scale)  # (N, out) ⊙ (out,) + b
        if x2_drop is not x2:  # dropout acts on the adapter's input only, as in the paper's code and PEFT:
            h = h + F.linear(x2 - x2_drop, self.weight)  # the base term keeps W x whole: + W (x - dropout(x))
        return h.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W + scaling · B A‖ of each row of the unmerged layer, (out,), at least float32: DoRA divides by it.

        Expanded row by row, ‖w + s (B A)‖² = ‖w‖² + 2 s B·(W Aᵀ) + s² B·(B A Aᵀ), so that no (out, in) matrix
        is built on every step, as the direct form would (PEFT's does). W Aᵀ is rounded to W's dtype, which moves
        the norm by less than that dtype's roundoff times ‖s B A‖ / ‖W‖.
        """
        A, B = self.lora_A.to(self._precise), self.lora_B.to(self._precise)  # (r, in), (out, r)
        w_sq = torch.linalg.vector_norm(self.weight, dim=1, dtype=self._precise).square()  # (out,)
        w_at = F.linear(self.weight, self.lora_A).to(self._precise)  # (out, in) @ (in, r) -> (out, r)
        b_aat = B @ (A @ A.T)  # (out, r) @ (r, r) -> (out, r)
        s = self.scaling
        return (w_sq + 2 * s * (B * w_at).sum(1) + s * s * (B * b_aat).sum(1)).clamp_min(0).sqrt()  # (out,)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, the (out, in) update that LoRA's merge() adds to W, in W's dtype."""
        return self._precise_delta_weight().to(self.weight.dtype)

    def _precise_delta_weight(self) -> torch.Tensor:
        B, A = self.lora_B.to(self._precise), self.lora_A.to(self._precise)
        return self.scaling * (B @ A)  # (out, r) @ (r, in) -> (out, in)

    @torch.no_grad()
    def _fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the weight merge() writes, in W's dtype; DoRA's norm it divides by, else None); ValueError if it
        is not finite."""
        dtensor = sys.modules.get("torch.distributed.tensor")  # loaded wherever a tensor can be a DTensor
        if dtensor is not None and isinstance(self.weight, dtensor.DTensor):
            raise ValueError("the weight is sharded (a DTensor, e.g. under FSDP2's fully_shard), and a layer merged "
                             "in place would no longer be gathered: merge a copy that holds full tensors (e.g. "
                             "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                             "StateDictOptions(full_state_dict=True)) loaded into an unsharded model)")
        merged = self._precise_delta_weight().add_(self.weight)  # (out, in), float32 or wider: W + s B A
        norm = None
        if self.use_dora:
            norm = torch.linalg.vector_norm(merged, dim=1)  # (out,): the precise W + s B A is here already
            merged.mul_((self.lora_magnitude.to(self._precise) / norm)[:, None])  # each row rescaled to length m
        merged = merged.to(self.weight.dtype)  # checked after the cast: float16 overflows at 65504
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging would put NaN or Inf into the {self.weight.dtype} weight; lora_A or lora_B "
                             f"has diverged (|A|max={self.lora_A.abs().max().item():g}, "
                             f"|B|max={self.lora_B.abs().max().item():g})")
        return merged, norm

    def merged_weight(self) -> torch.Tensor:
        """A new tensor holding the adapted weight: W + scaling · B A (DoRA: each row rescaled to length m),
        computed in float32 (float64 for a float64 layer) and cast to W's dtype; ValueError if not finite."""
        return self.weight.detach().clone() if self.merged else self._fold()[0]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W in place, so forward is one matmul; no copy of W is kept. No-op if merged.

        Rounding: W + ΔW (DoRA: scaled per row) is formed in float32 and rounded once to W's dtype, and
        unmerge() rounds once more on the way back. So unmerge() returns W only to within, per element,
            u·|W| + (u + k·2^-24)·|W + ΔW|     (+ 2^-24 in float16, near zero where it is subnormal)
        u the unit roundoff of W's dtype (2^-24 float32, 2^-11 float16, 2^-8 bfloat16), k = 1 for LoRA and 3
        for DoRA (float32 roundings of its row scale). disable_lora stays exact on unmerged layers; merged ones
        it unmerges and merges again.
        """
        if self.merged:
            return
        merged, norm = self._fold()  # raises before anything changes
        if self.use_dora and (self.lora_magnitude == 0).any():
            raise ValueError("lora_magnitude has zeros: merging would zero those rows of W for good, so unmerge() "
                             "could not restore them (merge_lora, which never unmerges, can)")
        self.weight.copy_(merged)
        self.merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of W again, up to the rounding merge() states. A no-op if not merged."""
        if not self.merged:
            return
        w = self.weight.to(self._precise)  # (out, in); a float32 W is W itself, updated in place
        if self.use_dora:
            w.mul_((self.merged_norm / self.lora_magnitude.to(self._precise))[:, None])  # back to W + s B A
        self.weight.copy_(w.sub_(self._precise_delta_weight()))
        self.merged_norm = None
        self.merged = False

    # A merged layer's state_dict holds W + ΔW beside lora_A and lora_B. It says so (`lora_merged`, and DoRA's
    # `lora_merged_norm`), and loading adopts the merged state it finds, so ΔW is never applied twice.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "lora_merged"] = torch.tensor(True)
            if self.use_dora:
                destination[prefix + "lora_merged_norm"] = self.merged_norm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        flags = (prefix + "lora_merged", prefix + "lora_merged_norm")
        loads_weight = prefix + "weight" in state_dict
        merged = flags[0] in state_dict
        if loads_weight and merged and self.use_dora and flags[1] not in state_dict:
            error_msgs.append(f"{prefix}weight is a merged DoRA weight but {flags[1]} is missing: cannot unmerge it")
            return
        if self.merged and not loads_weight and any(prefix + n in state_dict for n in ADAPTER_NAMES):
            error_msgs.append(f"layer {prefix[:-1]!r} is merged: loading its adapter without its weight would "
                              "leave the old update in W; unmerge() it first")
            return
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        unexpected_keys[:] = [k for k in unexpected_keys if k not in flags]
        if loads_weight and len(error_msgs) == errors_before:
            self.merged = merged
            self.merged_norm = (state_dict[flags[1]].to(self.weight.device, self._precise)
                                if merged and self.use_dora else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"{'use_dora=True, ' if self.use_dora else ''}merged={self.merged}")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, layer) for every LoRALinear in the model, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.rsplit(".", 1)[-1] == pattern or fnmatch.fnmatchcase(name, pattern)


def add_lora(model: nn.Module, r: int, alpha: float | None = None, targets: str | Iterable[str] | None = None,
             dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False,
             use_dora: bool = False) -> list[str]:
    """Wrap in place every nn.Linear whose name matches `targets`; return the wrapped names in module order.

    Args:
        targets: None for every nn.Linear; else a name or list of names, each an exact qualified name
            ("encoder.0.query"), a last name component ("query") or a glob ("layers.*.attn.q_proj").
            Every target must match something, and everything it matches must be an nn.Linear.
    """
    _check_hparams(r, alpha, dropout, init, use_rslora, use_dora)
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
        _check_base(modules[n], name=f"module {n!r}", use_dora=use_dora)
        if isinstance(modules[n.rpartition(".")[0]], nn.MultiheadAttention):
            raise TypeError(f"module {n!r} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                            "directly and would silently ignore the adapter; target other layers")
    for n in names:  # all checks passed: now change the model
        _set_submodule(model, n, LoRALinear(modules[n], r, alpha, dropout, init, use_rslora, use_dora))
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze every parameter except the adapters' (and biases: "all" of them, or "lora_only")."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_NAMES or
                         (bias == "all" and name.rsplit(".", 1)[-1] == "bias"))
    if bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def _trained_biases(model: nn.Module) -> list[str]:
    """The biases that train while the rest of their module, adapters aside, is frozen: those that
    mark_only_lora_as_trainable(bias="all" | "lora_only") left trainable. A module trained in full is not here."""
    names = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if ("bias" in own and own["bias"].requires_grad and
                not any(p.requires_grad for n, p in own.items() if n not in ("bias", *ADAPTER_NAMES))):
            names.append(f"{name}.bias" if name else "bias")
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What LoRA fine-tuning changed, a few KB to MB instead of the whole model, for load_lora_state_dict.

    Every `<path>.lora_A`, `<path>.lora_B` (and DoRA's `<path>.lora_magnitude`), the biases that
    mark_only_lora_as_trainable(bias=...) left trainable, and each layer's hyperparameters as 0-dim tensors
    `<path>.lora_alpha` and `<path>.lora_use_rslora` (r is lora_A's first dimension), so that loading into a
    layer with another alpha fails instead of silently changing the update. A module trained in full
    (a classifier head) is not an adapter: save its state_dict too, or use lora_peft.save_peft_adapter.
    """
    keep = {f"{n}.{p}" for n, layer in lora_layers(model) for p in ADAPTER_NAMES if hasattr(layer, p)}
    keep.update(_trained_biases(model))
    state = {k: v for k, v in model.state_dict().items() if k in keep}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_alpha"] = torch.tensor(layer.alpha, dtype=torch.float64)
        state[f"{name}.lora_use_rslora"] = torch.tensor(layer.use_rslora)
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load what lora_state_dict saved into a model wrapped the same way (same targets, r, alpha, use_rslora,
    use_dora). Checks every key, shape and hyperparameter before copying anything."""
    params = model.state_dict()
    own = lora_state_dict(model)
    required = {k for k in own if k.rsplit(".", 1)[-1] != "bias"}  # biases: whichever the adapter trained
    missing = sorted(required - state_dict.keys())
    unexpected = sorted(k for k in state_dict.keys() - required
                        if not (k.rsplit(".", 1)[-1] == "bias" and k in params))
    if missing or unexpected:
        raise KeyError(f"adapter state_dict does not fit this model: missing keys {missing}, unexpected keys "
                       f"{unexpected} (was add_lora called with the same targets and use_dora?)")
    for name, layer in lora_layers(model):
        saved = (state_dict[f"{name}.lora_alpha"].item(), bool(state_dict[f"{name}.lora_use_rslora"]))
        if saved != (layer.alpha, layer.use_rslora):
            raise ValueError(f"layer {name!r}: the adapter was trained with alpha={saved[0]:g}, "
                             f"use_rslora={saved[1]}; this layer has alpha={layer.alpha:g}, "
                             f"use_rslora={layer.use_rslora} (add_lora with the adapter's alpha and use_rslora)")
    for k, v in state_dict.items():
        target = params[k] if k in params else own[k]
        if v.shape != target.shape:
            raise ValueError(f"shape mismatch for {k!r}: state_dict has {tuple(v.shape)}, "
                             f"model has {tuple(target.shape)} (same r?)")
    if merged := [n for n, layer in lora_layers(model) if layer.merged]:
        raise RuntimeError(f"cannot load an adapter into merged layers {merged}: unmerge() them first")
    for k, v in state_dict.items():
        if k in params:
            params[k].copy_(v)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding its adapted weight, merged in place (no second copy
    of W); returns the model. Every layer is checked before any is changed, so a diverged adapter leaves the
    model as it was. The weights must be whole tensors: under FSDP2, merge an unsharded copy loaded from a full
    state dict. (merge states the rounding.)
    """
    layers = list(lora_layers(model))
    for name, layer in layers:
        try:
            layer.merged_weight()
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    with torch.no_grad():
        for name, layer in layers:
            if not layer.merged:
                layer.weight.copy_(layer._fold()[0])
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device="meta")  # no allocation: both parameters are replaced below
            linear.weight = layer.weight
            linear.bias = layer.bias
            _set_submodule(model, name, linear)
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Inside: the model computes the base model's output: exactly on unmerged layers; merged layers are
    unmerged in place (up to merge's rounding) and merged again on exit. On exit: as before."""
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

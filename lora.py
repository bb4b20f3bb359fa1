"""
LoRA in one file that imports only torch: copy it into your project and use it.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pretrained weight W and learns a low-rank update beside it:

    h = W x + b + (alpha / r) · B A x           W: (out, in) frozen,  A: (r, in),  B: (out, r)

        x ──► W ─────────────────────────────┐
        │                                    + ──► h
        └──► dropout ──► A ──► B ──► · alpha/r

What it wraps (add_lora's `targets`, by name; targets=None takes every nn.Linear, Conv1D, convolution and
nn.MultiheadAttention but the output embedding: on a transformer, what PEFT's target_modules="all-linear" takes;
on a CNN, its convolutions too, which "all-linear" skips; it warns naming the kinds of layer it left out):
- nn.Linear, and subclasses that keep its forward; one with its own forward (a quantized layer, say) is refused:
  its output is not F.linear of its .weight, so neither the base term nor a merge would be what it computes.
- transformers' Conv1D (GPT-2), recognised by class name without importing transformers; its W is (in, out).
- nf4.py's LinearNF4 (QLoRA), by class name: the base term is its own output (its 4-bit W dequantized), adapters
  float32 by default. merge() is refused (folding ΔW into 4 bits would round it again); merge_lora gives an
  nn.Linear holding the dequantized W + ΔW, the weights the adapter was trained against.
- nn.Embedding, by name, as PEFT: A (r, num_embeddings), B (dim, r); the looked-up row of (alpha / r) · (B A)ᵀ is
  added to W's row, and the padding_idx row stays W's. max_norm and sparse are refused; dropout does not apply.
- nn.Conv1d/2d/3d, as PEFT: A is a convolution like the base's (kernel, stride, padding, dilation) with r output
  channels, B a 1×1 one: ΔW = scaling · B ∘ A has W's shape. groups > 1 is refused (W cannot hold a dense ΔW).
- nn.MultiheadAttention, as PEFT: one A (r, E) and B (3E, r) over the packed in_proj_weight, so Wk is adapted
  with the paper's Wq and Wv (PEFT's layout: adapters move both ways), and out_proj as a LoRALinear. forward runs
  the module's own with W + ΔW, so every path sees the update. out_proj alone, and kdim/vdim, are refused.
- In an nn.TransformerEncoderLayer, whose eval fast path reads the weights itself, wrapping switches that path (and
  its encoder's nested tensors) off, so the adapter counts in eval too; merge_lora switches it back on.
- Refused, each saying what to do instead: a weight tied to another module's (merging would change both: untie
  it, or leave it out), a layer with forward hooks or an instance forward, a weight computed by a parametrization
  (weight_norm, ...), the model itself when it is a bare layer, and DoRA on anything but nn.Linear. Every check
  runs before anything changes: a refused call leaves the model as it was.
- add_lora freezes only the weights it wraps (mark_only_lora_as_trainable freezes the rest; if most parameters still
  train at the first training forward, it warns once). BatchNorm's running statistics are not in the adapter.

Guarantees:
- Initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear, PEFT and loralib
  do ("gaussian": N(0, std=1/r), as PEFT's); B = 0 (Embedding, as PEFT: A = 0, B ~ N(0, 1)). So training starts
  at the base model: bit for bit on a CPU in float32; on a GPU forward's fused addmm may pick another GEMM kernel
  than nn.Linear does (7e-7 at most for a 384 -> 384 layer on an H100).
- Scaling: alpha / r. With alpha held fixed while r varies, dividing by r keeps the update's size roughly
  independent of r under Adam, so one learning rate serves every rank (paper, section 4.1). alpha defaults to r
  (scaling 1; PEFT's default is 8). use_rslora=True scales by alpha / sqrt(r) (Kalajdzievski, 2023, arXiv:2312.03732).
- Precision: on a float16/bfloat16 base, A, B (and DoRA's m) are float32 by default, as in PEFT, so that small
  Adam updates are not rounded away; forward adds the update to the base's output in float32 and rounds
  once into the base's dtype, and merging forms W + ΔW in float32 and rounds once into W's dtype.
- DoRA (Liu et al., 2024, arXiv:2402.09353), use_dora=True, nn.Linear only: a trainable magnitude m (out,),
  initialised to W's row norms, sets the length of each output row of the adapted weight; the norm is a constant
  in backward (paper, section 4.3), as in PEFT:   h = m ⊙ (W + scaling · B A) x / ‖W + scaling · B A‖ + b
- The wrapped layer keeps the base's parameter names: `<path>.weight` and `<path>.bias` are the base's own
  tensors (not copies), so a checkpoint saved before add_lora loads after it; the adapter adds
  `<path>.lora_A` and `<path>.lora_B` (and `<path>.lora_magnitude` for DoRA).
- merge() folds the update into W in place; unmerge() takes it out again, up to rounding (see merge). A merged
  layer refuses to train rather than silently train nothing. merge_lora gives back the original module types.
- lora_state_dict holds every tensor that trained plus the settings to rebuild the wrapping, tensors only
  (torch.load(weights_only=True) and safetensors both carry it); load_lora_state_dict wraps a fresh model itself.
  Hugging Face PEFT's adapter files: lora_peft.py beside this file (optional; it needs safetensors).

    import lora
    lora.add_lora(model, r=8, targets=["query", "value"])       # use_dora=True for DoRA
    lora.mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    ...train...
    torch.save(lora.lora_state_dict(model), "adapter.pt")
    lora.load_lora_state_dict(fresh_model, torch.load("adapter.pt", weights_only=True))
    model = lora.merge_lora(model)          # the original layers again, for deployment
"""

import contextlib
import copy
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
ADAPTER_NAMES = ("lora_A", "lora_B", "lora_magnitude")  # the trainable tensors of a LoRA layer
SETTINGS = ("lora_alpha", "lora_use_rslora", "lora_dropout")  # per-layer settings saved beside them
SUPPORTED = ("lora.py wraps nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention: "
             "target those (print(model) shows them)")


# ─── the layer ────────────────────────────────────────────────────────────────────────────────────────────────

def _check_hparams(r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype=None) -> None:
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
    if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
        raise ValueError(f"adapter_dtype must be None or a floating torch.dtype, got {adapter_dtype!r}")


TORCH_BASES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _kind(module: nn.Module) -> str | None:
    """"linear", "conv1d" (transformers' Conv1D, W stored (in, out)), "embedding", "conv" (nn.Conv1d/2d/3d),
    "mha" (nn.MultiheadAttention), "nf4" (nf4.py's LinearNF4: its weight is an NF4Weight module with .dequantize(),
    .linear(x, b), .shape, .dtype), or None if not wrappable."""
    if type(module).__name__ == "LinearNF4" and callable(getattr(getattr(module, "weight", None), "linear", None)):
        return "nf4"
    for cls, kind in zip(TORCH_BASES, ("linear", "embedding", "conv", "conv", "conv", "mha")):
        if isinstance(module, cls):
            return kind
    conv1d = type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) and \
        module.weight.shape == (getattr(module, "nx", None), getattr(module, "nf", None))
    return "conv1d" if conv1d else None


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight W that the adapter updates: an nn.MultiheadAttention's is its packed in_proj_weight (3E, E)."""
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


def _shapes(module: nn.Module, r: int) -> tuple[tuple, tuple]:
    """The shapes of A and B, as PEFT stores them: (r, in) and (out, r); a convolution's A has the base's kernel,
    (r, in, *kernel), and its B is 1×1, (out, r, 1, ...)."""
    w = _weight(module)
    out, *rest = w.shape[::-1] if _kind(module) in ("conv1d", "embedding") else w.shape  # W stored (in, out)
    return (r, *rest), (out, r, *[1] * (len(rest) - 1))


def _check_base(base: nn.Module, name: str = "base", use_dora: bool = False) -> None:
    """Raise unless lora.py can wrap `base` exactly: the module, its class and what is supported."""
    if isinstance(base, LoRALayer):
        raise ValueError(f"{name} already carries LoRA; wrapping it again would stack a second adapter (was add_lora "
                         "run twice, e.g. by re-running a notebook cell?): start from a fresh model, or merge_lora it")
    kind, cls = _kind(base), type(base).__name__
    if kind is None:
        raise TypeError(f"{name} is a {cls}; {SUPPORTED}")
    own = next((c for c in type(base).__mro__ if c in TORCH_BASES), None)
    if own is not None and type(base).forward is not own.forward:
        raise TypeError(f"{name} is a {cls}, a subclass of nn.{own.__name__} with its own forward (a quantized "
                        f"layer, say): its output is not what lora.py computes from its .weight, and merging into "
                        f"that weight would not be either; lora.py wraps nn.{own.__name__} and subclasses that keep "
                        f"its forward: adapt the layer before replacing it, or leave it out of targets")
    hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(base, h, None)] + (["an instance forward"] if "forward" in base.__dict__ else [])
    if hooks:
        raise TypeError(f"{name} is a {cls} with {', '.join(hooks)} (added by a library or by hand): they would "
                        "not run on the wrapped layer's output, and would again after merge_lora; remove them first")
    if torch.nn.utils.parametrize.is_parametrized(base):
        raise TypeError(f"{name} is a {cls} whose weight is computed by a parametrization (weight_norm, "
                        f"spectral_norm, ...): merging into it is not defined; {SUPPORTED} with a plain weight")
    if kind == "embedding" and (base.max_norm is not None or base.sparse):
        raise TypeError(f"{name} is an nn.Embedding with max_norm={base.max_norm}, sparse={base.sparse}: max_norm "
                        "renormalises W's rows in place at every lookup and sparse gradients do not reach A; "
                        "lora.py wraps embeddings without them: leave it out of targets")
    if kind == "conv" and base.groups > 1:
        raise TypeError(f"{name} is a {cls} with groups={base.groups}: B ∘ A is a dense (out, in, *kernel) update that "
                        f"its grouped weight (out, in / {base.groups}, *kernel) cannot hold, so it could not merge; "
                        "leave it out of targets and adapt the ungrouped convolutions beside it (the 1×1 ones)")
    if kind == "mha" and not base._qkv_same_embed_dim:
        raise TypeError(f"{name} is an nn.MultiheadAttention with kdim or vdim unlike embed_dim, so q, k and v have "
                        "separate weights; lora.py (as PEFT) adapts the packed in_proj_weight: leave it out of targets")
    if kind == "mha":
        _check_base(base.out_proj, f"{name}'s out_proj")
    if use_dora and kind != "linear":
        raise TypeError(f"{name} is a {cls}: use_dora=True wraps nn.Linear only (its row norms are those of a matrix "
                        "W); add this layer in a second add_lora call with use_dora=False, or leave it out of targets")
    if use_dora and not base.weight.is_meta and (zero := (base.weight == 0).all(dim=1)).any():
        raise ValueError(f"{name} has all-zero rows {zero.nonzero().flatten()[:10].tolist()} in its weight; DoRA "
                         "divides each row by its norm: wrap this layer with use_dora=False, or leave it out")


class LoRALayer(nn.Module):
    """What every LoRA layer shares: settings, A and B, merging, and the state dict. See LoRALinear."""

    def __init__(self, base: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__()
        _check_hparams(r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
        _check_base(base, use_dora=use_dora)
        if not isinstance(self, want := LAYERS[_kind(base)]):
            raise TypeError(f"base is a {type(base).__name__}: wrap it with {want.__name__} (add_lora picks it)")
        a_shape, b_shape = _shapes(base, r)
        in_features, out_features = math.prod(a_shape[1:]), b_shape[0]
        if r > (most := min(in_features, out_features)):
            warnings.warn(f"r={r} exceeds min(in_features, out_features) = min({in_features}, {out_features}): B A has "
                          f"rank at most {most}, so the extra parameters add no expressiveness", stacklevel=3)
        self.kind = _kind(base)
        self.transposed = self.kind in ("conv1d", "embedding")  # W stored (in, out): ΔW is (s · B A)ᵀ
        self.r = int(r)
        self.alpha = float(r if alpha is None else alpha)
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.dropout = float(dropout)
        self.enabled = True  # False inside disable_lora(): the layer computes the base output only
        self.merged = False  # True after merge(): W holds the adapted weight
        self.train(base.training)  # wrapping a model in eval mode leaves it in eval mode
        # The base module without its tensors, given back by merge_lora: its class and settings, no second copy.
        skeleton = copy.copy(base)
        skeleton._parameters = dict.fromkeys(base._parameters)
        self.__dict__["base_skeleton"] = skeleton

        # The base's own Parameters (weight, bias; in_proj_weight, ...), not copies: same names, no extra memory.
        for n, p in base._parameters.items():
            setattr(self, n, p if p is None else p.requires_grad_(False))
        if self.kind == "nf4":  # its W is a module (the 4-bit codes and their scales): kept, under the same names
            self.weight = base.weight
        if adapter_dtype is None:  # float32 adapters on a half-precision base, as PEFT: see the module docstring
            half = self.weight.dtype in (torch.float16, torch.bfloat16)
            adapter_dtype = torch.float32 if half else self.weight.dtype
        factory = dict(device=self.weight.device, dtype=adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **factory))  # (r, in); a convolution's (r, in, *kernel)
        self.lora_B = nn.Parameter(torch.zeros(b_shape, **factory))  # (out, r); a convolution's (out, r, 1, ...)
        self._init_adapter(init)
        # DoRA, while merged: the norm merge() divided by, so that unmerge() can undo it. Saved only when merged.
        self.register_buffer("merged_norm", None, persistent=False)

    def _init_adapter(self, init: str) -> None:
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan_in = in: U(-1/sqrt(in), 1/sqrt(in))
        else:
            nn.init.normal_(self.lora_A, std=1 / self.r)

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    @property
    def _precise(self) -> torch.dtype:
        """float32, or wider if W or the adapter is: the dtype of merges and of DoRA's norm."""
        return torch.promote_types(torch.promote_types(self.weight.dtype, self.lora_A.dtype), torch.float32)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """lora_A, lora_B (and DoRA's lora_magnitude): what fine-tuning trains."""
        return [self.lora_A, self.lora_B] + ([self.lora_magnitude] if self.use_dora else [])

    def _check_not_training_merged(self) -> None:
        if self.merged and self.training and torch.is_grad_enabled() and \
                any(p.requires_grad for p in self.adapter_parameters()):
            raise RuntimeError(f"this {type(self).__name__} is merged, so its adapter would get no gradient: call "
                               "unmerge() before training (for inference, call eval() or use torch.no_grad())")

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, the update that merge() adds to W, in W's layout and dtype."""
        return self._precise_delta_weight().to(self.weight.dtype)

    def _precise_delta_weight(self) -> torch.Tensor:
        B, A = self.lora_B.to(self._precise).flatten(1), self.lora_A.to(self._precise).flatten(1)
        delta = self.scaling * (B @ A)  # (out, r) @ (r, in) -> (out, in); a convolution's in is in · kernel
        return delta.T if self.transposed else delta.view(self.weight.shape)

    def _adapted_weight(self) -> torch.Tensor:
        """W + ΔW rounded once to W's dtype, differentiable in A and B: for a parent that reads W itself."""
        if self.merged or not self.enabled:
            return self.weight
        return (self.weight.to(self._precise) + self._precise_delta_weight()).to(self.weight.dtype)

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
        w = self.weight.dequantize() if self.kind == "nf4" else self.weight  # NF4: the W the adapter trained on
        merged = self._precise_delta_weight().add_(w)  # float32 or wider: W + s B A
        norm = None
        if self.use_dora:
            norm = torch.linalg.vector_norm(merged, dim=1)  # (out,): the precise W + s B A is here already
            merged.mul_((self.lora_magnitude.to(self._precise) / norm)[:, None])  # each row rescaled to length m
        merged = merged.to(self.weight.dtype)  # checked after the cast: float16 overflows at 65504
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging would put NaN or Inf into the {self.weight.dtype} weight; lora_A or lora_B "
                             f"has diverged (|A|max={self.lora_A.abs().max().item():g}, |B|max="
                             f"{self.lora_B.abs().max().item():g}): retrain at a lower rate, or load an earlier one")
        return merged, norm

    def merged_weight(self) -> torch.Tensor:
        """A new tensor holding the adapted weight: W + scaling · B A (DoRA: each row rescaled to length m),
        computed in float32 (float64 for a float64 layer) and cast to W's dtype; ValueError if not finite."""
        return self.weight.detach().clone() if self.merged else self._fold()[0]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W in place, so forward is the base layer's; no copy of W is kept. No-op if merged.

        Rounding: W + ΔW (DoRA: scaled per row) is formed in float32 and rounded once to W's dtype, and
        unmerge() rounds once more on the way back. So unmerge() returns W only to within, per element,
            u·|W| + (u + k·2^-24)·|W + ΔW|     (+ 2^-24 in float16, near zero where it is subnormal)
        u the unit roundoff of W's dtype (2^-24 float32, 2^-11 float16, 2^-8 bfloat16), k = 1 for LoRA and 3
        for DoRA (float32 roundings of its row scale). disable_lora stays exact on unmerged layers; merged ones
        it unmerges and merges again.
        """
        if self.merged:
            return
        if self.kind == "nf4":
            raise TypeError("merge() would fold ΔW into the 4-bit weight, rounding it to NF4 again and losing most of "
                            "the update; merge_lora(model) gives an nn.Linear holding the dequantized W + ΔW instead")
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
        w = self.weight.to(self._precise)  # a float32 W is W itself, updated in place
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
            error_msgs.append(f"{prefix}weight is a merged DoRA weight but {flags[1]} is missing: cannot unmerge "
                              "it (save the layer unmerged)")
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
        dtype = "" if self.lora_A.dtype == self.weight.dtype else f"adapter_dtype={self.lora_A.dtype}, "
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, {dtype}"
                f"{'use_dora=True, ' if self.use_dora else ''}merged={self.merged}")


class LoRALinear(LoRALayer):
    """nn.Linear (or transformers' Conv1D) with a frozen weight plus a trainable low-rank update
    (alpha / r) · B A, and for DoRA a magnitude.

    Args:
        base: the nn.Linear or Conv1D to adapt; its weight and bias are kept (same tensors) and frozen.
        r: the rank of the update B A (paper, section 4.1; section 7.2: a small r suffices on attention).
        alpha: scaling = alpha / r; None means alpha = r, scaling 1 (PEFT's default is alpha = 8).
        dropout: dropout on the adapter's input only, as in the paper's code (its GPT-2 runs use 0.1, appendix D).
        init: "kaiming" (A uniform, as nn.Linear) or "gaussian" (A ~ N(0, 1/r)); B = 0 either way (section 4.1).
        use_rslora: scale by alpha / sqrt(r) (rsLoRA, arXiv:2312.03732) instead of alpha / r.
        use_dora: DoRA's magnitude and direction (arXiv:2402.09353); nn.Linear only.
        adapter_dtype: dtype of A, B and m; None: float32 on a float16/bfloat16 base, else W's dtype.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float | None = None, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False,
                 adapter_dtype: torch.dtype | None = None):
        super().__init__(base, r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
        if use_dora:
            norms = torch.linalg.vector_norm(self.weight.detach(), dim=1, dtype=self._precise)  # (out,)
            self.lora_magnitude = nn.Parameter(norms.to(self.lora_A.dtype))  # m = ‖W‖: starts at the base model

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b as the base layer computes it."""
        if self.kind == "nf4":  # LinearNF4's forward: F.linear(x, W, b), its 4-bit W dequantized (again in backward)
            return self.weight.linear(x, self.bias)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)  # Conv1D: (N, in) @ (in, out) + b, as transformers computes it
        h = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return h.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W x + b + (alpha / r) · B A dropout(x)   (DoRA: see _dora_forward)."""
        if self.merged or not self.enabled:
            self._check_not_training_merged()
            return self._base(x)  # merged: W holds W + ΔW; disabled: the base model
        if self.use_dora:
            return self._dora_forward(x)
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        x2_drop = F.dropout(x2, self.dropout, self.training) if self.dropout > 0 else x2  # p = 0: no copy of x
        # In place below is safe: linear's backward needs its inputs, never its output.
        u = F.linear(x2_drop.to(self.lora_A.dtype), self.lora_A).mul_(self.scaling)  # (N, in) @ (in, r) -> (N, r)
        # A float32 adapter on a half-precision base: add in float32, round once. NF4: no W for addmm below.
        if self.lora_A.dtype != x.dtype or self.kind == "nf4":
            delta = F.linear(u, self.lora_B).view(*x.shape[:-1], self.out_features)  # (N, r) @ (r, out)
            return (self._base(x) + delta).to(x.dtype)
        v = F.linear(u, self.lora_B, self.bias)  # (N, r) @ (r, out) + b -> (N, out)
        # v + x Wᵀ: the big GEMM adds v while it writes its output, so there is no extra pass over (N, out).
        w_t = self.weight if self.transposed else self.weight.t()  # (in, out)
        return torch.addmm(v, x2, w_t).view(*x.shape[:-1], self.out_features)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """m ⊙ (W + s B A) x / ‖W + s B A‖ + b, through the same (x Aᵀ) Bᵀ as LoRA: no (out, in) matrix per step."""
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        x2_drop = F.dropout(x2, self.dropout, self.training) if self.dropout > 0 else x2
        scale = (self.lora_magnitude.to(self._precise) / self.weight_norm()).to(x.dtype)  # (out,): m / ‖W + s B A‖
        u = F.linear(x2_drop.to(self.lora_A.dtype), self.lora_A).mul_(self.scaling)  # (N, in) @ (in, r) -> (N, r)
        if self.lora_A.dtype == x.dtype:
            v = torch.addmm(F.linear(u, self.lora_B), x2_drop, self.weight.t())  # (N, r)@(r, out) + (N, in)@(in, out)
        else:
            v = (F.linear(x2_drop, self.weight) + F.linear(u, self.lora_B)).to(x.dtype)
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
        w_at = F.linear(self.weight, self.lora_A.to(self.weight.dtype)).to(self._precise)  # (out, in) @ (in, r)
        b_aat = B @ (A @ A.T)  # (out, r) @ (r, r) -> (out, r)
        s = self.scaling
        return (w_sq + 2 * s * (B * w_at).sum(1) + s * s * (B * b_aat).sum(1)).clamp_min(0).sqrt()  # (out,)


class LoRAEmbedding(LoRALayer):
    """nn.Embedding with a frozen table W (num_embeddings, dim) plus a trainable (alpha / r) · (B A)ᵀ, PEFT's
    convention: A (r, num_embeddings) starts at zero, B (dim, r) at N(0, 1), so the update starts at zero.

    Args: as LoRALinear (base an nn.Embedding); `dropout` is kept for saving but not applied (indices cannot be
    dropped out, as in PEFT), `init` has no effect, and use_dora is refused.
    """
    bias = None

    def _init_adapter(self, init: str) -> None:
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)
        self.padding_idx = self.base_skeleton.padding_idx
        self.scale_grad_by_freq = self.base_skeleton.scale_grad_by_freq

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.weight, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W[x] + (alpha / r) · (B A)ᵀ[x] = W[x] + (alpha / r) · Aᵀ[x] Bᵀ."""
        if self.merged or not self.enabled:
            self._check_not_training_merged()
            return self._base(x)
        h = self._base(x)  # (..., dim)
        after_a = F.embedding(x, self.lora_A.T, self.padding_idx, scale_grad_by_freq=self.scale_grad_by_freq)
        return (h + after_a @ self.lora_B.T * self.scaling).to(h.dtype)  # (..., r) @ (r, dim) -> (..., dim)


class LoRAConv(LoRALayer):
    """nn.Conv1d/2d/3d with a frozen W (out, in, *kernel) plus A, a convolution like the base's with r output
    channels, then B, a 1×1 one (see the module docstring). Args: as LoRALinear; use_dora is refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = conv(x, W) + b + (alpha / r) · B ∘ A (dropout(x))."""
        conv = self.base_skeleton._conv_forward  # the base's stride, padding (and its mode), dilation
        h = conv(x, self.weight, self.bias)  # (N, in, *size) -> (N, out, *size')
        if self.merged or not self.enabled:
            self._check_not_training_merged()
            return h
        x_drop = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        u = conv(x_drop.to(self.lora_A.dtype), self.lora_A, None)  # (N, in, *size) -> (N, r, *size')
        delta = (F.conv1d, F.conv2d, F.conv3d)[u.dim() - 3](u, self.lora_B)  # 1×1: (N, r, *size') -> (N, out, *size')
        return (h + delta * self.scaling).to(h.dtype)


class LoRAMultiheadAttention(LoRALayer):
    """nn.MultiheadAttention with A (r, E), B (3E, r) over in_proj_weight (3E, E: Wq, Wk, Wv stacked) and a
    LoRALinear as out_proj, as PEFT. The module reads its weights itself (its fast path too), so forward runs its
    own forward with W + ΔW in their place: every path (training, eval, fast path, need_weights, masks) computes
    what the module computes with the adapted weights, and gradients reach A and B. Dropout does not apply (as in
    PEFT): the update is in W. Args: as LoRALinear; use_dora is refused."""

    weight = property(lambda self: self.in_proj_weight)  # W: (3E, E)
    bias = property(lambda self: self.in_proj_bias)  # (3E,) or None

    def __init__(self, base: nn.MultiheadAttention, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        self.out_proj = LoRALinear(base.out_proj, *args, **kwargs)

    def __getattr__(self, name: str):  # embed_dim, batch_first, ...: what PyTorch's layers read off self_attn
        base = self.__dict__.get("base_skeleton")
        if base is not None and (name in base.__dict__ or hasattr(type(base), name)):
            return getattr(base, name)
        return super().__getattr__(name)

    def forward(self, *args, **kwargs):
        """nn.MultiheadAttention's forward, with W + ΔW for in_proj_weight and out_proj.weight."""
        self._check_not_training_merged()
        self.out_proj._check_not_training_merged()
        weights = {n: p for n, p in self._parameters.items() if p is not None and n not in ADAPTER_NAMES}
        weights |= {"in_proj_weight": self._adapted_weight(), "out_proj.weight": self.out_proj._adapted_weight(),
                    "out_proj.bias": self.out_proj.bias}
        return torch.func.functional_call(self.base_skeleton.train(self.training), weights, args, kwargs)


LAYERS = {"linear": LoRALinear, "conv1d": LoRALinear, "embedding": LoRAEmbedding, "conv": LoRAConv,
          "mha": LoRAMultiheadAttention, "nf4": LoRALinear}


# ─── adding and freezing ──────────────────────────────────────────────────────────────────────────────────────

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(qualified name, layer) for every LoRA layer in the model, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _matches(name: str, pattern: str) -> bool:
    """An exact qualified name, a dotted end of it (as PEFT matches: "attention.output.dense"), or a glob."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _select(model: nn.Module, patterns, what: str) -> list[str]:
    """The module names matched by `patterns` (a name or a list of names), in module order; every pattern must
    match something."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what} must be a non-empty name or a non-empty list of them, got {patterns!r}")
    names = [n for n, _ in model.named_modules() if n]
    wrappable = [n for n, m in model.named_modules() if _kind(m) or isinstance(m, LoRALayer)]
    for p in patterns:
        if not any(_matches(n, p) for n in names):
            raise ValueError(f"{what} {p!r} matches no module; the layers lora.py can wrap are: {wrappable}")
    return [n for n in names if any(_matches(n, p) for p in patterns)]


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """id of each parameter -> the names of every module holding it as its own (tied weights have several)."""
    owners = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None and name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
    return owners


def _check_target(model: nn.Module, name: str, owners: dict, use_dora: bool, why: str = "") -> None:
    """Raise unless module `name` of the model can be wrapped so that the adapter counts and merges exactly."""
    modules = dict(model.named_modules())
    if not name:
        raise ValueError(f"the model itself is a {type(model).__name__}: add_lora wraps layers inside a model; "
                         "wrap this one with LoRALinear(layer, r) (or LoRAEmbedding), or put it in an nn.Sequential")
    module, parent = modules[name], modules[name.rpartition(".")[0]]
    label = f"module {name!r}{why}"
    if isinstance(parent, nn.MultiheadAttention):
        raise TypeError(f"{label} is the out_proj of an nn.MultiheadAttention, which reads its weight directly and "
                        f"would ignore an adapter there; target the attention itself ({name.rpartition('.')[0]!r}): "
                        "lora.py adapts its in_proj and out_proj together")
    _check_base(module, name=label, use_dora=use_dora)
    if len(tied := [n for n in owners.get(id(_weight(module)), []) if n != name]):
        raise ValueError(f"{label} ({type(module).__name__}) shares its weight with {tied} (tied weights): merging "
                         f"would change both. Leave it out of targets, or untie it first, e.g. "
                         f"model.{name}.weight = nn.Parameter(model.{name}.weight.detach().clone())")


def add_lora(model: nn.Module, r: int, alpha: float | None = None, targets: str | Iterable[str] | None = None,
             dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False,
             use_dora: bool = False, adapter_dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the target layers in place (freezing their weights); return the wrapped names in module order.

    Args:
        r: the rank of each update B A (paper, section 4.1; section 7.2, Table 6: a small r suffices on Wq and Wv).
        alpha: scaling = alpha / r (section 4.1); None means alpha = r, scaling 1. PEFT's default is alpha = 8:
            pass alpha=8 to match a LoraConfig that does not set lora_alpha.
        targets: None takes every nn.Linear, Conv1D, nn.Conv1d/2d/3d and nn.MultiheadAttention but the module
            model.get_output_embeddings() returns (on a transformer: PEFT's target_modules="all-linear"), and warns
            naming the kinds of layer it left out. Else a name or list of names, each an exact qualified name
            ("encoder.0.query"), its dotted end as in PEFT ("query") or a glob ("layers.*.attn.q_proj"); these may
            also name nn.Embedding layers. Every target must match something, and all it matches must be wrappable.
        dropout: dropout on the adapter's input (the paper's code); not applied to embeddings.
        init: "kaiming" or "gaussian" initialisation of A; B starts at zero (section 4.1).
        use_rslora: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
        use_dora: DoRA (nn.Linear only).
        adapter_dtype: dtype of the adapters; None: float32 on a float16/bfloat16 base, else the base's dtype.
    """
    _check_hparams(r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
    modules = dict(model.named_modules())
    if any(isinstance(m, LoRALayer) for m in modules.values()) and targets is None:
        raise ValueError("model already carries LoRA layers; add_lora(targets=None) would stack a second adapter "
                         f"on them: {[n for n, _ in lora_layers(model)]}; name the new layers in targets")
    owners = _owners(model)
    if targets is None:
        get_out = getattr(model, "get_output_embeddings", None)
        output = get_out() if callable(get_out) else None
        names, left_out = [], {}
        for n, m in modules.items():
            kind, cls = _kind(m), type(m).__name__
            why = (f"{cls} with groups > 1" if kind == "conv" and m.groups > 1 else
                   f"{cls} with kdim or vdim" if kind == "mha" and not m._qkv_same_embed_dim else
                   f"{cls} (use_dora=True)" if use_dora and kind not in (None, "linear", "embedding") else
                   cls if kind is None and not m._modules and any(
                       p is not None and p.dim() > 1 for p in m._parameters.values()) else None)
            if why:
                left_out[why] = left_out.get(why, 0) + 1
            elif kind not in (None, "embedding") and m is not output and \
                    not isinstance(modules[n.rpartition(".")[0]], nn.MultiheadAttention):  # its out_proj: with it
                names.append(n)
        if left_out:
            warnings.warn(f"targets=None left out layers that lora.py does not wrap, by kind and count: {left_out}; "
                          "name one in targets to see why", stacklevel=2)
        if not names:
            raise ValueError(f"model ({type(model).__name__}) has no layer that targets=None takes; {SUPPORTED}")
        for n in names:
            _check_target(model, n, owners, use_dora)
    else:
        names = _select(model, targets, "target")
        for n in names:
            _check_target(model, n, owners, use_dora, why=" (matched by targets)")
    for n in names:  # all checks passed: now change the model
        _wrap(model, n, modules[n], r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
    if _warn_if_mostly_trainable not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_warn_if_mostly_trainable)
    return names


def _warn_if_mostly_trainable(model: nn.Module, args) -> None:
    """A hook add_lora leaves on the model: at its first training forward, warn once if most parameters train."""
    if model.training and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        for key in [k for k, h in model._forward_pre_hooks.items() if h is _warn_if_mostly_trainable]:
            del model._forward_pre_hooks[key]
        trainable, total = count_parameters(model)
        total += sum(m.shape.numel() for m in model.modules() if type(m).__name__ == "NF4Weight")  # frozen, 4-bit
        if trainable > total / 2:
            warnings.warn(f"{trainable:,} of the model's {total:,} parameters train: add_lora froze only the weights "
                          "it wrapped. Call lora.mark_only_lora_as_trainable(model) before training (modules_to_save="
                          "[...] for a new head), unless you mean to train them all", stacklevel=5)


def _wrap(model: nn.Module, name: str, module: nn.Module, *args) -> LoRALayer:
    layer = LAYERS[_kind(module)](module, *args)
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.TransformerEncoderLayer):  # its eval fast path would read W directly, skipping us
        _switch_off(parent, "activation_relu_or_gelu", 0)  # the slow path uses parent.activation: same function
        for encoder in model.modules():  # its encoder's nested-tensor path checks layers[0] only: off too
            if isinstance(encoder, nn.TransformerEncoder) and any(m is parent for m in encoder.layers):
                _switch_off(encoder, "use_nested_tensor", False)
    _set_submodule(model, name, layer)
    return layer


def _switch_off(module: nn.Module, flag: str, value) -> None:
    """Set one of PyTorch's fast-path flags, keeping its first value for merge_lora to restore."""
    module.__dict__.setdefault("lora_fast_path_flags", {}).setdefault(flag, getattr(module, flag))
    setattr(module, flag, value)


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none",
                                modules_to_save: str | Iterable[str] | None = None) -> None:
    """Freeze every parameter except the adapters' (and biases: "all" of them, or "lora_only"), and except
    the modules in `modules_to_save` (PEFT's name), which train in full: a new task's head, new embeddings.
    They are given by name as add_lora's targets; lora_state_dict saves them."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    full = [] if modules_to_save is None else _select(model, modules_to_save, "modules_to_save")
    if lora := [n for n in full if isinstance(model.get_submodule(n), LoRALayer)]:
        raise ValueError(f"modules_to_save {lora} carry LoRA: a layer is either adapted or trained in full; name it "
                         "in add_lora's targets or in modules_to_save, not both")
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_NAMES or
                         (bias == "all" and name.rsplit(".", 1)[-1] == "bias"))
    if bias == "lora_only":
        for _, layer in lora_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
    for n in full:
        model.get_submodule(n).requires_grad_(True)


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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable and total parameters and the trainable share, as PEFT's print_trainable_parameters."""
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


# ─── saving and loading ───────────────────────────────────────────────────────────────────────────────────────

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that fine-tuning trained, and what load_lora_state_dict needs to rebuild the wrapping.

    Tensors only, so torch.load(weights_only=True) and safetensors both carry it:
    - each LoRA layer's `<path>.lora_A`, `<path>.lora_B` (and DoRA's `<path>.lora_magnitude`), whose shapes
      give r and whose dtype is the adapter dtype, and 0-dim `<path>.lora_alpha`, `<path>.lora_use_rslora`,
      `<path>.lora_dropout`;
    - every other parameter that requires grad under its state_dict name (trained biases, the modules of
      mark_only_lora_as_trainable(modules_to_save=...)), with the buffers of modules that train in full.
    ValueError if the model has no LoRA layers.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layers to save: call lora.add_lora first")
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    full = [n for n, m in model.named_modules() if not isinstance(m, LoRALayer) and
            (own := list(m.parameters(recurse=False))) and all(p.requires_grad for p in own)]
    buffers = {f"{n}.{b}" if n else b for n in full for b, _ in model.get_submodule(n).named_buffers(recurse=False)}
    adapters = {f"{n}.{p}" for n, layer in layers for p in ADAPTER_NAMES if hasattr(layer, p)}
    state = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()
             if k in adapters or k in buffers or id(v) in trained}
    for name, layer in layers:
        state[f"{name}.lora_alpha"] = torch.tensor(layer.alpha, dtype=torch.float64)
        state[f"{name}.lora_use_rslora"] = torch.tensor(layer.use_rslora)
        state[f"{name}.lora_dropout"] = torch.tensor(layer.dropout, dtype=torch.float64)
    return state


def _saved_layers(state_dict: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{layer path: {"lora_A": ..., "lora_alpha": ..., ...}} from an adapter state dict."""
    layers = {}
    for k, v in state_dict.items():
        path, _, leaf = k.rpartition(".")
        if leaf in ADAPTER_NAMES + SETTINGS:
            layers.setdefault(path, {})[leaf] = v
    for path, got in layers.items():
        if missing := [k for k in ("lora_A", "lora_B", "lora_alpha", "lora_use_rslora") if k not in got]:
            raise KeyError(f"adapter state_dict: layer {path!r} lacks {missing}: save with lora.lora_state_dict")
    return layers


def _layer_settings(got: dict) -> dict:
    """The add_lora settings an adapter layer was saved with (dropout None in files older than it)."""
    dropout = got.get("lora_dropout")
    return dict(r=got["lora_A"].shape[0], alpha=got["lora_alpha"].item(), use_rslora=bool(got["lora_use_rslora"]),
                use_dora="lora_magnitude" in got, adapter_dtype=got["lora_A"].dtype,
                dropout=None if dropout is None else dropout.item())


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load what lora_state_dict saved; returns the LoRA layers' names.

    Into a model never wrapped, it wraps the saved layers itself with their saved settings; into a wrapped model,
    its LoRA layers must be the saved ones. Keys, then shapes, then settings are checked before anything
    changes; a mismatch raises, saying which and how to fix it. Files from older lora.py versions (no
    `lora_dropout`) load into a model wrapped by hand with the same add_lora call.
    """
    saved = _saved_layers(state_dict)
    own = dict(lora_layers(model))
    modules = dict(model.named_modules())
    if not saved:
        raise KeyError("the state_dict holds no lora_A / lora_B tensors: it is not an adapter from lora_state_dict")
    tops = [p for p in saved if not (p.rpartition(".")[0] in saved and  # an attention's out_proj comes with it
                                     _kind(modules.get(p.rpartition(".")[0])) == "mha")]
    if own and set(own) != set(saved):
        raise KeyError(f"the model's LoRA layers are not the adapter's: the model lacks {sorted(set(saved) - set(own))}"
                       f", the adapter lacks {sorted(set(own) - set(saved))} (was add_lora called with the same "
                       "targets?) Or load into a model without LoRA, which is then wrapped as the adapter was.")
    if not own:
        if old := [p for p, got in saved.items() if "lora_dropout" not in got]:
            raise ValueError(f"layers {old} were saved by an older lora.py that did not record dropout: call "
                             "add_lora(model, ...) with the settings they were trained with, then load")
        if absent := [p for p in saved if p not in modules]:
            raise KeyError(f"the adapter has layers {absent}, which the model lacks: load it into the model it was "
                           "trained on")
        owners = _owners(model)
        for path, got in saved.items():
            if path in tops:
                _check_target(model, path, owners, "lora_magnitude" in got, why=" (in the adapter)")
            s = _layer_settings(got)
            try:
                _check_hparams(s["r"], s["alpha"], s["dropout"], "kaiming", s["use_rslora"], s["use_dora"],
                               s["adapter_dtype"])
            except ValueError as e:
                raise ValueError(f"layer {path!r} of the adapter: {e}") from None
    others = {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in ADAPTER_NAMES + SETTINGS}
    params = model.state_dict()
    if unexpected := sorted(k for k in others if k not in params):
        raise KeyError(f"adapter state_dict does not fit this model: unexpected keys {unexpected}; load it into the "
                       "model it was trained on")
    for path, got in saved.items():  # shapes first: this layer's r if wrapped, else the adapter's
        r = own[path].r if own else got["lora_A"].shape[0]
        want = dict(zip(("lora_A", "lora_B"), (tuple(own[path].lora_A.shape), tuple(own[path].lora_B.shape)) if own else
                        _shapes(modules[path], r)))
        want["lora_magnitude"] = want["lora_B"][:1]
        for k in ADAPTER_NAMES:
            if k in got and tuple(got[k].shape) != tuple(want[k]):
                raise ValueError(f"layer {path!r}: the adapter's {k} has shape {tuple(got[k].shape)}, but this "
                                 f"layer at r={r} needs {want[k]} (the adapter has r="
                                 f"{got['lora_A'].shape[0]}: add_lora with that r, or load into a model without LoRA)")
    for k, v in others.items():
        if v.shape != params[k].shape:
            raise ValueError(f"shape mismatch for {k!r}: state_dict has {tuple(v.shape)}, "
                             f"model has {tuple(params[k].shape)}")
    for path, layer in own.items():  # then settings
        got = _layer_settings(saved[path])
        have = dict(r=layer.r, alpha=layer.alpha, use_rslora=layer.use_rslora, use_dora=layer.use_dora,
                    adapter_dtype=layer.lora_A.dtype, dropout=layer.dropout)
        if diff := {k: (got[k], have[k]) for k in got if got[k] is not None and got[k] != have[k]}:
            raise ValueError(f"layer {path!r}: the adapter was saved with {({k: v[0] for k, v in diff.items()})}, "
                             f"this layer has {({k: v[1] for k, v in diff.items()})}: call add_lora with the "
                             "adapter's settings, or load into a model without LoRA")
    if merged := [n for n, layer in own.items() if layer.merged]:
        raise RuntimeError(f"cannot load an adapter into merged layers {merged}: unmerge() them first")

    if not own:  # all checks passed: now change the model, and let train what trained
        for path in (n for n in modules if n in tops):
            s = _layer_settings(saved[path])
            _wrap(model, path, modules[path], s["r"], s["alpha"], s["dropout"], "kaiming", s["use_rslora"],
                  s["use_dora"], s["adapter_dtype"])
        own = dict(lora_layers(model))
        for n, p in model.named_parameters():
            p.requires_grad_(n.rpartition(".")[2] in ADAPTER_NAMES or n in others)
    for path, got in saved.items():
        for k in ADAPTER_NAMES:
            if k in got:
                getattr(own[path], k).copy_(got[k])
    for k, v in others.items():
        params[k].copy_(v)
    return list(own)


# ─── merging ──────────────────────────────────────────────────────────────────────────────────────────────────

def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by the module it wrapped (its class and settings), holding the adapted weight,
    merged in place (no second copy of W); returns the model. Every layer is checked before any is changed, so a
    diverged adapter leaves the model as it was. The weights must be whole tensors: under FSDP2, merge an
    unsharded copy loaded from a full state dict. (merge states the rounding.) Merge before Hugging Face's
    save_pretrained: it saves W and drops the adapters.
    """
    layers = list(lora_layers(model))
    for name, layer in layers:
        try:
            layer.merged_weight()
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    with torch.no_grad():
        for name, layer in layers:
            if layer.kind == "nf4":  # a plain nn.Linear: dequantized W + ΔW, never the W before quantization
                base = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
                base.weight, base.bias = nn.Parameter(layer._fold()[0], requires_grad=False), layer.bias
            else:
                if not layer.merged:
                    layer.weight.copy_(layer._fold()[0])
                base = copy.copy(layer.base_skeleton)
                base._parameters = {n: layer._parameters.get(n) for n in base._parameters}
                base._modules = {n: getattr(layer, n) for n in base._modules}  # an attention's out_proj: next
            base.train(layer.training)
            _set_submodule(model, name, base)
    for m in model.modules():  # no adapter remains: PyTorch's fast path again, where _wrap switched it off
        m.__dict__.update(m.__dict__.pop("lora_fast_path_flags", {}))
    return model


# ─── switching off ────────────────────────────────────────────────────────────────────────────────────────────

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

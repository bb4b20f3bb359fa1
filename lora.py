"""
LoRA in one file that imports only torch: copy it into your project and use it.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes a pretrained weight W and learns a low-rank update beside it:

    h = W x + b + (alpha / r) · B A x           W: (out, in) frozen,  A: (r, in),  B: (out, r)

        x ──► W ─────────────────────────────┐
        │                                    + ──► h
        └──► dropout ──► A ──► B ──► · alpha/r

What it wraps: each layer kind is a class (LAYERS: the first that accepts a module wraps it) that owns what
differs: LoRALinear (nn.Linear and subclasses that keep its forward), LoRAConv1D (GPT-2's Conv1D), LoRALinearNF4
(nf4.py's 4-bit LinearNF4, QLoRA), LoRAEmbedding, LoRAConv (nn.Conv1d/2d/3d) and LoRAMultiheadAttention (in_proj and
out_proj, as PEFT). add_lora(targets=None) takes every one of them but embeddings and the output embedding (PEFT's
"all-linear"), warning which kinds it left out. Refused, each saying what to do instead: a tied weight, forward hooks
or an instance forward, a parametrized weight, a subclass with its own forward, the model itself, a second adapter
of the same name, DoRA on anything but nn.Linear, a grouped convolution, an embedding with max_norm or sparse, an
attention with kdim/vdim or its out_proj alone; every check runs before anything changes. Wrapping a layer of an
nn.TransformerEncoderLayer switches its eval fast path off (it reads the weights itself); merge_lora, on again.

Guarantees:
- Initialisation: A ~ kaiming_uniform(a=sqrt(5)) as nn.Linear, PEFT and loralib ("gaussian": N(0, 1/r)); B = 0
  (Embedding, as PEFT: A = 0, B ~ N(0, 1)). Training starts at the base model, bit for bit on a CPU in float32.
- Scaling: alpha / r (alpha defaults to r; PEFT's default is 8): with alpha fixed, one learning rate serves every
  rank under Adam (paper, section 4.1). use_rslora=True: alpha / sqrt(r) (arXiv:2312.03732).
- Precision: on a float16/bfloat16 base, A and B are float32 by default, as in PEFT; the update is added in
  float32 and rounded once into the base's dtype, and so is a merge.
- DoRA (arXiv:2402.09353), use_dora=True, nn.Linear only: h = m ⊙ (W + s B A) x / ‖W + s B A‖ + b, m trainable
  (out,), the norm a constant in backward (section 4.3), as PEFT.
- Names: `<path>.weight` and `<path>.bias` stay the base's own tensors, so a checkpoint saved before add_lora loads
  after it; the first adapter ("default") adds `<path>.lora_A`, `<path>.lora_B` (DoRA: `<path>.lora_magnitude`).
- Several adapters, PEFT's vocabulary: add_lora(..., adapter="b"), set_adapter (a list sums them), delete_adapter,
  state dicts and merges per adapter; adapter_per_example(model, names) runs a batch in which example i uses
  adapter names[i] (None: the base).
- merge() folds the update into W in place, unmerge() takes it out up to rounding; merge_lora gives back the
  original module types. lora_state_dict holds tensors only (torch.load(weights_only=True), safetensors);
  load_lora_state_dict wraps a fresh model itself. PEFT's files: lora_peft.py beside this file.

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
import dataclasses
import fnmatch
import functools
import inspect
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
DEFAULT = "default"  # its tensors are <path>.lora_A, ...; another adapter's <path>.lora_adapters.<name>.lora_A
STACK_MAX_RANK = 128  # a mixed batch stacks its adapters' A (and B) into one product while their ranks sum to <= this
SUPPORTED = ("lora.py wraps nn.Linear, transformers' Conv1D, nn.Embedding, nn.Conv1d/2d/3d and nn.MultiheadAttention: "
             "target those (print(model) shows them)")


# ─── the settings ─────────────────────────────────────────────────────────────────────────────────────────────

@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """The settings of one adapter, checked once here (paper sections cited); the layers and add_lora take them."""
    r: int  # the rank of B A (section 4.1; section 7.2, Table 6: a small r suffices on Wq and Wv)
    alpha: float | None = None  # scaling = alpha / r; None: alpha = r, scaling 1 (PEFT's default is alpha = 8)
    dropout: float = 0.0  # on the adapter's input only, as the paper's code (GPT-2: 0.1); embeddings: not applied
    init: str = "kaiming"  # A as nn.Linear's weight, or "gaussian": A ~ N(0, 1/r); B = 0 either way (section 4.1)
    use_rslora: bool = False  # scale by alpha / sqrt(r) (rsLoRA, arXiv:2312.03732) instead of alpha / r
    use_dora: bool = False  # DoRA's magnitude and direction (arXiv:2402.09353); nn.Linear only
    adapter_dtype: torch.dtype | None = None  # of A, B (and m); None: float32 on a float16/bfloat16 base, else W's

    def __post_init__(self):
        r, alpha, dropout, dtype = self.r, self.alpha, self.dropout, self.adapter_dtype
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                                  or not math.isfinite(alpha) or alpha <= 0):
            raise ValueError(f"alpha must be a positive finite number or None (meaning alpha = r), got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"adapter_dtype must be None or a floating torch.dtype, got {dtype!r}")
        object.__setattr__(self, "r", int(r))
        object.__setattr__(self, "alpha", float(r if alpha is None else alpha))
        object.__setattr__(self, "dropout", float(dropout))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_adapter_name(adapter) -> None:
    if not isinstance(adapter, str) or not adapter.isidentifier():
        raise ValueError(f"adapter must be a name that is a Python identifier (it becomes part of parameter names), "
                         f"got {adapter!r}")


# ─── the layers ───────────────────────────────────────────────────────────────────────────────────────────────

def check_base(base: nn.Module, name: str = "base", use_dora: bool = False) -> None:
    """Raise unless lora.py can wrap `base` exactly: the module, its class and what is supported."""
    if isinstance(base, LoRALayer):
        raise ValueError(f"{name} already carries LoRA; wrapping it again would stack a second adapter (was add_lora "
                         "run twice, e.g. by re-running a notebook cell?): start from a fresh model, or merge_lora it")
    kind, cls = layer_class(base), type(base).__name__
    if kind is None:
        raise TypeError(f"{name} is a {cls}; {SUPPORTED}")
    own = next((c for c in type(base).__mro__ if c in kind.torch_bases), None)
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
    kind.check(base, name)
    if use_dora:
        _check_dora(kind, base, name)


def _check_dora(kind: type, base: nn.Module, name: str) -> None:
    if not kind.dora:
        raise TypeError(f"{name} is a {type(base).__name__}: use_dora=True wraps nn.Linear only (its row norms are "
                        "those of a matrix W); add this layer in a second add_lora call with use_dora=False, or leave "
                        "it out of targets")
    if not base.weight.is_meta and (zero := (base.weight == 0).all(dim=1)).any():
        raise ValueError(f"{name} has all-zero rows {zero.nonzero().flatten()[:10].tolist()} in its weight; DoRA "
                         "divides each row by its norm: wrap this layer with use_dora=False, or leave it out")


class _Adapter(nn.Module):
    """Holds a named adapter's lora_A, lora_B (lora_magnitude) inside a LoRA layer's `lora_adapters`."""


class LoRALayer(nn.Module):
    """What every LoRA layer shares: its adapters (settings, A, B), merging, the mixed batch and the state dict.
    A subclass owns one kind of layer: which module it `accepts` and why it refuses one (`check`), the adapter
    `shapes`, the base term `_base(x)`, one adapter's update `_delta(x, adapter)` (scaling · B A dropout(x)) and
    what merge_lora gives back (`merged_module`). Args: see LoRALinear."""

    torch_bases: tuple = ()  # the torch classes it wraps (and subclasses of them that keep their forward)
    kind = None  # a short name for reprs and messages
    transposed = False  # W stored (in, out): ΔW is (s · B A)ᵀ
    dora = False  # whether use_dora=True is defined for it

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.torch_bases)

    @classmethod
    def check(cls, base: nn.Module, name: str) -> None:
        """Raise TypeError, saying why and what to do, for a module of this kind it cannot wrap exactly."""

    @classmethod
    def weight_of(cls, base: nn.Module) -> torch.Tensor:
        return base.weight

    @classmethod
    def shapes(cls, base: nn.Module, r: int) -> tuple[tuple, tuple]:
        """The shapes of A and B, as PEFT stores them: (r, in) and (out, r)."""
        out, inp = cls.weight_of(base).shape[::-1] if cls.transposed else cls.weight_of(base).shape
        return (r, inp), (out, r)

    def __init__(self, base: nn.Module, r: int | None = None, alpha: float | None = None, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False, use_dora: bool = False,
                 adapter_dtype: torch.dtype | None = None, *, config: LoRAConfig | None = None, adapter: str = DEFAULT):
        super().__init__()
        config = config or LoRAConfig(r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
        _check_adapter_name(adapter)
        check_base(base, use_dora=config.use_dora)
        if next(c for c in type(self).__mro__ if c in LAYERS) is not (want := layer_class(base)):
            raise TypeError(f"base is a {type(base).__name__}: wrap it with {want.__name__} (add_lora picks it)")
        a_shape, b_shape = self.shapes(base, 1)
        self.in_features, self.out_features = math.prod(a_shape[1:]), b_shape[0]
        self.configs: dict[str, LoRAConfig] = {}  # adapter name -> settings, in the order they were added
        self.active: tuple[str, ...] = (adapter,)  # the adapters forward sums (set_adapter sets them model-wide)
        self.enabled = True  # False inside disable_lora(): the layer computes the base output only
        self.merged = False  # True after merge(): W holds the adapted weight
        self.merged_adapters: tuple[str, ...] = ()
        self.per_example = None  # inside adapter_per_example: (batch_dim, batch size, {adapter: its rows})
        self.train(base.training)  # wrapping a model in eval mode leaves it in eval mode
        # The base module without its tensors, given back by merge_lora: its class and settings, no second copy.
        skeleton = copy.copy(base)
        skeleton._parameters = dict.fromkeys(base._parameters)
        self.__dict__["base_skeleton"] = skeleton
        self._take_base(base)
        self.register_buffer("merged_norm", None, persistent=False)  # DoRA, while merged: what merge() divided by
        self.add_adapter(adapter, config, stacklevel=4)

    def _take_base(self, base: nn.Module) -> None:
        """Hold the base's own Parameters (weight, bias; in_proj_weight, ...), not copies: same names, same memory."""
        for n, p in base._parameters.items():
            setattr(self, n, p if p is None else p.requires_grad_(False))

    # -- the adapters --

    def add_adapter(self, adapter: str, config: LoRAConfig, stacklevel: int = 3) -> None:
        """Add a new adapter `adapter` (A random, B zero) beside the others; it is not made active."""
        _check_adapter_name(adapter)
        if adapter in self.configs:
            raise ValueError(f"this layer already has an adapter {adapter!r} (was add_lora run twice, e.g. by "
                             "re-running a notebook cell?): delete_adapter it first, or pick another name")
        if config.use_dora:
            _check_dora(type(self), self, "this layer")
        if config.r > (most := min(self.in_features, self.out_features)):
            warnings.warn(f"r={config.r} exceeds min(in_features, out_features) = min({self.in_features}, "
                          f"{self.out_features}): B A has rank at most {most}, so the extra parameters add no "
                          "expressiveness", stacklevel=stacklevel)
        half = self.weight.dtype in (torch.float16, torch.bfloat16)  # then float32 adapters, as PEFT
        dtype = config.adapter_dtype or (torch.float32 if half else self.weight.dtype)
        a_shape, b_shape = self.shapes(self, config.r)
        if adapter != DEFAULT:
            self.lora_adapters = self._modules.get("lora_adapters") or nn.ModuleDict()
            self.lora_adapters[adapter] = _Adapter()
        slot = self if adapter == DEFAULT else self.lora_adapters[adapter]
        slot.lora_A = nn.Parameter(torch.empty(a_shape, device=self.weight.device, dtype=dtype))  # (r, in)
        slot.lora_B = nn.Parameter(torch.zeros(b_shape, device=self.weight.device, dtype=dtype))  # (out, r)
        self.configs[adapter] = config
        self._init_adapter(slot, config)
        if config.use_dora:  # m = ‖W‖: starts at the base model
            norms = torch.linalg.vector_norm(self.weight.detach(), dim=1, dtype=self._precise(adapter))  # (out,)
            slot.lora_magnitude = nn.Parameter(norms.to(dtype))

    def _init_adapter(self, slot: nn.Module, config: LoRAConfig) -> None:
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(slot.lora_A, a=math.sqrt(5))  # fan_in = in: U(-1/sqrt(in), 1/sqrt(in))
        else:
            nn.init.normal_(slot.lora_A, std=1 / config.r)

    def delete_adapter(self, adapter: str) -> None:
        if self.merged and adapter in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter!r} is merged into this layer's weight: unmerge() first")
        del self.configs[adapter]
        if adapter == DEFAULT:
            for n in ADAPTER_NAMES:
                self._parameters.pop(n, None)
        else:
            del self.lora_adapters[adapter]
        self.active = tuple(a for a in self.active if a != adapter)

    def adapter_tensors(self, adapter: str) -> dict[str, nn.Parameter]:
        """{"lora_A": ..., "lora_B": ... (, "lora_magnitude": ...)} of one adapter."""
        slot = self if adapter == DEFAULT else self.lora_adapters[adapter]
        return {n: slot._parameters[n] for n in ADAPTER_NAMES if slot._parameters.get(n) is not None}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """lora_A, lora_B (and DoRA's lora_magnitude) of the active adapters: what fine-tuning trains."""
        return [p for a in self._active() for p in self.adapter_tensors(a).values()]

    def _active(self) -> tuple[str, ...]:
        return tuple(a for a in self.active if a in self.configs)

    @property
    def config(self) -> LoRAConfig:
        """The settings of the first active adapter this layer has (else of its first adapter)."""
        return self.configs[(self._active() or tuple(self.configs))[0]]

    r = property(lambda self: self.config.r)
    alpha = property(lambda self: self.config.alpha)
    dropout = property(lambda self: self.config.dropout)
    use_rslora = property(lambda self: self.config.use_rslora)
    use_dora = property(lambda self: self.config.use_dora)
    scaling = property(lambda self: self.config.scaling)

    def _precise(self, adapter: str | None = None) -> torch.dtype:
        """float32, or wider if W or the adapter is: the dtype of merges and of DoRA's norm."""
        dtypes = [self.adapter_tensors(a)["lora_A"].dtype for a in ([adapter] if adapter else self.configs)]
        return functools.reduce(torch.promote_types, dtypes, torch.promote_types(self.weight.dtype, torch.float32))

    def _check_not_training_merged(self) -> None:
        if self.merged and self.training and torch.is_grad_enabled() and \
                any(p.requires_grad for a in self.merged_adapters for p in self.adapter_tensors(a).values()):
            raise RuntimeError(f"this {type(self).__name__} is merged, so its adapter would get no gradient: call "
                               "unmerge() before training (for inference, call eval() or use torch.no_grad())")

    # -- the update as a weight: merging --

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A summed over the active adapters: what merge() adds to W, in W's layout and dtype."""
        return self._precise_delta_weight(self._active()).to(self.weight.dtype)

    def _precise_delta_weight(self, adapters: Iterable[str]) -> torch.Tensor:
        delta = torch.zeros(self.weight.shape, dtype=self._precise(), device=self.weight.device)
        for a in adapters:
            t = self.adapter_tensors(a)
            B, A = t["lora_B"].to(delta.dtype).flatten(1), t["lora_A"].to(delta.dtype).flatten(1)
            d = self.configs[a].scaling * (B @ A)  # (out, r) @ (r, in) -> (out, in); a convolution's in is in · kernel
            delta += d.T if self.transposed else d.view(self.weight.shape)
        return delta

    def _adapted_weight(self, adapters: tuple[str, ...] | None = None) -> torch.Tensor:
        """W + ΔW rounded once to W's dtype, differentiable in A and B: for a parent that reads W itself."""
        adapters = self._active() if adapters is None else adapters
        if self.merged or not self.enabled or not adapters:
            return self.weight
        return (self.weight.to(self._precise()) + self._precise_delta_weight(adapters)).to(self.weight.dtype)

    def _base_weight(self) -> torch.Tensor:
        return self.weight

    @torch.no_grad()
    def _fold(self, adapters: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the weight merge() writes, in W's dtype; DoRA's norm it divides by, else None); ValueError if not finite."""
        dtensor = sys.modules.get("torch.distributed.tensor")  # loaded wherever a tensor can be a DTensor
        if dtensor is not None and isinstance(self.weight, dtensor.DTensor):
            raise ValueError("the weight is sharded (a DTensor, e.g. under FSDP2's fully_shard), and a layer merged "
                             "in place would no longer be gathered: merge a copy that holds full tensors (e.g. "
                             "torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                             "StateDictOptions(full_state_dict=True)) loaded into an unsharded model)")
        _check_combination(adapters, self.configs)
        merged = self._precise_delta_weight(adapters).add_(self._base_weight())  # float32 or wider: W + s B A
        norm = None
        if len(adapters) == 1 and self.configs[adapters[0]].use_dora:
            m = self.adapter_tensors(adapters[0])["lora_magnitude"]
            norm = torch.linalg.vector_norm(merged, dim=1)  # (out,): the precise W + s B A is here already
            merged.mul_((m.to(merged.dtype) / norm)[:, None])  # each row rescaled to length m
        merged = merged.to(self.weight.dtype)  # checked after the cast: float16 overflows at 65504
        if not torch.isfinite(merged).all():
            A, B = (torch.cat([self.adapter_tensors(a)[k].flatten() for a in adapters]) for k in ("lora_A", "lora_B"))
            raise ValueError(f"merging would put NaN or Inf into the {self.weight.dtype} weight; lora_A or lora_B "
                             f"has diverged (|A|max={A.abs().max().item():g}, |B|max={B.abs().max().item():g}): "
                             "retrain at a lower rate, or load an earlier one")
        return merged, norm

    def merged_weight(self, adapters: tuple[str, ...] | None = None) -> torch.Tensor:
        """A new tensor holding the adapted weight: W + scaling · B A (DoRA: each row rescaled to length m),
        computed in float32 (float64 for a float64 layer) and cast to W's dtype; ValueError if not finite."""
        adapters = self._active() if adapters is None else tuple(a for a in adapters if a in self.configs)
        if self.merged:
            if set(adapters) != set(self.merged_adapters):
                raise ValueError(f"the layer is merged with {list(self.merged_adapters)}, not {list(adapters)}: "
                                 "unmerge() it first")
            return self.weight.detach().clone()
        return self._fold(adapters)[0]

    @torch.no_grad()
    def merged_module(self, adapters: tuple[str, ...] | None = None) -> nn.Module:
        """What merge_lora puts in this layer's place: the base module, its weight now W + ΔW (in place)."""
        if not self.merged:
            self.weight.copy_(self.merged_weight(adapters))
        return self.unwrapped()

    def unwrapped(self) -> nn.Module:
        """The base module, holding this layer's tensors as they are (no update folded in)."""
        base = copy.copy(self.base_skeleton)
        base._parameters = {n: self._parameters.get(n) for n in base._parameters}
        base._modules = {n: getattr(self, n) for n in base._modules}  # an attention's out_proj: merged next
        return base.train(self.training)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapters' update into W in place (no copy of W kept); a no-op if merged. W + ΔW is formed
        in float32 and rounded once to W's dtype, and unmerge() rounds once more: it returns W to within, per element,
        u·|W| + (u + k·2^-24)·|W + ΔW| (+ 2^-24 in float16 near zero), u the unit roundoff of W's dtype, k = 1 for
        LoRA and 3 for DoRA (float32 roundings of its row scale)."""
        if self.merged:
            return
        adapters = self._active()
        merged, norm = self._fold(adapters)  # raises before anything changes
        if norm is not None and (self.adapter_tensors(adapters[0])["lora_magnitude"] == 0).any():
            raise ValueError("lora_magnitude has zeros: merging would zero those rows of W for good, so unmerge() "
                             "could not restore them (merge_lora, which never unmerges, can)")
        self.weight.copy_(merged)
        self.merged_norm, self.merged, self.merged_adapters = norm, True, adapters

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of W again, up to the rounding merge() states. A no-op if not merged."""
        if not self.merged:
            return
        w = self.weight.to(self._precise())  # a float32 W is W itself, updated in place
        if self.merged_norm is not None:  # back to W + s B A
            w.mul_((self.merged_norm / self.adapter_tensors(self.merged_adapters[0])["lora_magnitude"]
                    .to(w.dtype))[:, None])
        self.weight.copy_(w.sub_(self._precise_delta_weight(self.merged_adapters)))
        self.merged_norm, self.merged, self.merged_adapters = None, False, ()

    # -- the forward: the base term plus each adapter's update --

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = base(x) + Σ over the active adapters of scaling · B A dropout(x)."""
        if self.merged or not self.enabled:
            self._check_not_training_merged()
            return self._base(x)  # merged: W holds W + ΔW; disabled: the base model
        if self.per_example is not None:
            return self._mixed_forward(x)
        out = h = self._base(x)
        for a in self._active():  # a float32 adapter on a half-precision base: add in float32, round once
            out = out + self._delta(x, a)
        return out.to(h.dtype)

    def _rows(self, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
        dim, n, groups = self.per_example
        dim = dim % x.dim()
        if x.shape[dim] != n:
            raise ValueError(f"adapter_per_example was given {n} names, but this {type(self).__name__}'s input "
                             f"{tuple(x.shape)} has {x.shape[dim]} along batch_dim={dim}: pass the batch's dimension "
                             "(nn.TransformerEncoder without batch_first: batch_dim=1)")
        return dim, groups

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each example's row through its own adapter: the base term once, each adapter's update on its rows."""
        dim, groups = self._rows(x)
        h = self._base(x)
        out = h.to(torch.promote_types(h.dtype, self._precise()) if groups else h.dtype)
        for a, rows in groups.items():
            out = out.index_add(dim, rows, self._delta(x.index_select(dim, rows), a).to(out.dtype))
        return out.to(h.dtype)

    # -- saving: a merged layer's state_dict holds W + ΔW beside lora_A and lora_B, says so (`lora_merged`, DoRA's
    # `lora_merged_norm`), and loading adopts the merged state it finds, so ΔW is never applied twice --
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            destination[prefix + "lora_merged"] = torch.tensor(True)
            if self.merged_norm is not None:
                destination[prefix + "lora_merged_norm"] = self.merged_norm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        flags = (prefix + "lora_merged", prefix + "lora_merged_norm")
        loads_weight, merged = prefix + "weight" in state_dict, flags[0] in state_dict
        dora = bool(self._active()) and self.configs[self._active()[0]].use_dora
        if loads_weight and merged and dora and flags[1] not in state_dict:
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
            self.merged, self.merged_adapters = merged, self._active() if merged else ()
            self.merged_norm = state_dict[flags[1]].to(self.weight.device, self._precise()) if merged and dora else None

    def extra_repr(self) -> str:
        a = (self._active() or tuple(self.configs))[0]  # the adapter whose settings `config` gives
        c, dtype = self.configs[a], self.adapter_tensors(a)["lora_A"].dtype
        dtype = "" if dtype == self.weight.dtype else f"adapter_dtype={dtype}, "
        names = f"adapters={list(self.configs)}, active={list(self.active)}, " if set(self.configs) != {DEFAULT} else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={c.r}, "
                f"alpha={c.alpha:g}, scaling={c.scaling:g}, dropout={c.dropout:g}, {dtype}{names}"
                f"{'use_dora=True, ' if c.use_dora else ''}merged={self.merged}")


class LoRALinear(LoRALayer):
    """nn.Linear with a frozen weight plus a trainable low-rank update (alpha / r) · B A, and for DoRA a magnitude.

    Args:
        base: the nn.Linear to adapt; its weight and bias are kept (same tensors) and frozen.
        r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype: the adapter's settings, each explained at its
            LoRAConfig field (paper sections cited); or config: a LoRAConfig. adapter: the adapter's name.
    """
    torch_bases, kind, dora = (nn.Linear,), "linear", True

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b as the base layer computes it."""
        return F.linear(x, self.weight, self.bias)

    def _delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        t, c = self.adapter_tensors(adapter), self.configs[adapter]
        x_drop = F.dropout(x, c.dropout, self.training) if c.dropout > 0 else x
        u = F.linear(x_drop.to(t["lora_A"].dtype), t["lora_A"]).mul_(c.scaling)  # (N, in) @ (in, r) -> (N, r)
        return F.linear(u, t["lora_B"])  # (N, r) @ (r, out) -> (N, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W x + b + (alpha / r) · B A dropout(x)   (DoRA: see _dora_forward)."""
        active = self._active()
        if self.merged or not self.enabled or self.per_example is not None or len(active) != 1:
            return super().forward(x)
        t, c = self.adapter_tensors(active[0]), self.configs[active[0]]
        if c.use_dora:
            return self._dora_forward(x, t, c)
        return self._fused(x, t["lora_A"], t["lora_B"], c.scaling, c.dropout)

    def _fused(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale, p: float) -> torch.Tensor:
        """W x + b + B ((A dropout(x)) ⊙ scale): scale a number, or (..., r) columns of a mixed batch's mask."""
        x_drop = F.dropout(x, p, self.training) if p > 0 else x  # p = 0: no copy of x
        # In place below is safe: linear's backward needs its inputs, never its output.
        u = F.linear(x_drop.to(A.dtype), A).mul_(scale)  # (..., in) @ (in, r) -> (..., r)
        if A.dtype != x.dtype or type(self) is not LoRALinear:
            h = self._base(x)  # added in the adapter's dtype (float32 on a half base), rounded once
            return (h + F.linear(u, B)).to(h.dtype)  # (..., r) @ (r, out) -> (..., out)
        v = F.linear(u.reshape(-1, A.shape[0]), B, self.bias)  # (N, r) @ (r, out) + b -> (N, out)
        # v + x Wᵀ: the big GEMM adds v while it writes its output, so there is no extra pass over (N, out).
        return torch.addmm(v, x.reshape(-1, self.in_features), self.weight.t()).view(*x.shape[:-1], self.out_features)

    def _dora_forward(self, x: torch.Tensor, t: dict, c: LoRAConfig) -> torch.Tensor:
        """m ⊙ (W + s B A) x / ‖W + s B A‖ + b, through the same (x Aᵀ) Bᵀ as LoRA: no (out, in) matrix per step."""
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        x2_drop = F.dropout(x2, c.dropout, self.training) if c.dropout > 0 else x2
        scale = (t["lora_magnitude"].to(self._precise()) / self.weight_norm()).to(x.dtype)  # (out,): m / ‖W + s B A‖
        u = F.linear(x2_drop.to(t["lora_A"].dtype), t["lora_A"]).mul_(c.scaling)  # (N, in) @ (in, r) -> (N, r)
        if t["lora_A"].dtype == x.dtype:
            v = torch.addmm(F.linear(u, t["lora_B"]), x2_drop, self.weight.t())  # (N, r)@(r, out) + (N, in)@(in, out)
        else:
            v = (F.linear(x2_drop, self.weight) + F.linear(u, t["lora_B"])).to(x.dtype)
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
        a = self._active()[0]
        t, s, precise = self.adapter_tensors(a), self.configs[a].scaling, self._precise(a)
        A, B = t["lora_A"].to(precise), t["lora_B"].to(precise)  # (r, in), (out, r)
        w_sq = torch.linalg.vector_norm(self.weight, dim=1, dtype=precise).square()  # (out,)
        w_at = F.linear(self.weight, t["lora_A"].to(self.weight.dtype)).to(precise)  # (out, in) @ (in, r)
        b_aat = B @ (A @ A.T)  # (out, r) @ (r, r) -> (out, r)
        return (w_sq + 2 * s * (B * w_at).sum(1) + s * s * (B * b_aat).sum(1)).clamp_min(0).sqrt()  # (out,)

    def _mixed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One pass where it pays: the adapters' A stacked into one product and B into another, each example's
        columns kept by a mask (K·r extra columns); sub-batches (the parent's) where their ranks sum past
        STACK_MAX_RANK, or where their dropout or dtype differ."""
        dim, groups = self._rows(x)
        configs = [self.configs[a] for a in groups]
        tensors = [self.adapter_tensors(a) for a in groups]
        if (len(groups) < 2 or sum(c.r for c in configs) > STACK_MAX_RANK or len({c.dropout for c in configs}) > 1
                or len({t["lora_A"].dtype for t in tensors}) > 1 or dim == x.dim() - 1):
            return super()._mixed_forward(x)
        A = torch.cat([t["lora_A"] for t in tensors])  # (K·r, in)
        B = torch.cat([t["lora_B"] for t in tensors], dim=1)  # (out, K·r)
        mask = torch.zeros(x.shape[dim], A.shape[0], dtype=A.dtype, device=A.device)  # (N, K·r): s on its columns
        start = 0
        for (a, rows), c in zip(groups.items(), configs):
            mask[rows, start:start + c.r] = c.scaling
            start += c.r
        mask = mask.view([x.shape[dim] if i == dim else 1 for i in range(x.dim() - 1)] + [A.shape[0]])
        return self._fused(x, A, B, mask, configs[0].dropout)  # others' columns zeroed


class LoRAConv1D(LoRALinear):
    """transformers' Conv1D (GPT-2), recognised by class name without importing transformers: W stored (in, out),
    so ΔW is (s · B A)ᵀ. Args: as LoRALinear; use_dora is refused."""
    torch_bases, kind, dora, transposed = (), "conv1d", False, True

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) and \
            module.weight.shape == (getattr(module, "nx", None), getattr(module, "nf", None))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (N, in) @ (in, out) + b, as transformers computes it
        h = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return h.view(*x.shape[:-1], self.out_features)


class LoRALinearNF4(LoRALinear):
    """nf4.py's LinearNF4 (QLoRA), by class name: the base term is its own output (its 4-bit W dequantized),
    adapters float32 by default. merge() is refused (folding ΔW into 4 bits would round it again); merge_lora gives
    an nn.Linear holding the dequantized W + ΔW. Args: as LoRALinear; use_dora is refused."""
    torch_bases, kind, dora = (), "nf4", False

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return type(module).__name__ == "LinearNF4" and callable(getattr(getattr(module, "weight", None), "linear",
                                                                         None))

    def _take_base(self, base: nn.Module) -> None:
        super()._take_base(base)
        self.weight = base.weight  # its W is a module (the 4-bit codes and their scales): kept, under the same names

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)  # F.linear(x, W, b), its 4-bit W dequantized (again in backward)

    def _base_weight(self) -> torch.Tensor:
        return self.weight.dequantize()  # the W the adapter trained on

    def merge(self) -> None:
        raise TypeError("merge() would fold ΔW into the 4-bit weight, rounding it to NF4 again and losing most of "
                        "the update; merge_lora(model) gives an nn.Linear holding the dequantized W + ΔW instead")

    def merged_module(self, adapters: tuple[str, ...] | None = None) -> nn.Module:
        base = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        base.weight = nn.Parameter(self.merged_weight(adapters), requires_grad=False)
        base.bias = self.bias
        return base.train(self.training)  # dequantized W + ΔW, never the W before quantization


class LoRAEmbedding(LoRALayer):
    """nn.Embedding with a frozen table W (num_embeddings, dim) plus a trainable (alpha / r) · (B A)ᵀ, PEFT's
    convention: A (r, num_embeddings) starts at zero, B (dim, r) at N(0, 1), so the update starts at zero.
    Args: as LoRALinear (base an nn.Embedding); `dropout` is kept for saving but not applied (indices cannot be
    dropped out, as in PEFT), `init` has no effect, and use_dora is refused."""
    torch_bases, kind, transposed = (nn.Embedding,), "embedding", True
    bias = None

    @classmethod
    def check(cls, base: nn.Module, name: str) -> None:
        if base.max_norm is not None or base.sparse:
            raise TypeError(f"{name} is an nn.Embedding with max_norm={base.max_norm}, sparse={base.sparse}: max_norm "
                            "renormalises W's rows in place at every lookup and sparse gradients do not reach A; "
                            "lora.py wraps embeddings without them: leave it out of targets")

    def _init_adapter(self, slot: nn.Module, config: LoRAConfig) -> None:
        nn.init.zeros_(slot.lora_A)
        nn.init.normal_(slot.lora_B)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        s = self.base_skeleton
        return F.embedding(x, self.weight, s.padding_idx, scale_grad_by_freq=s.scale_grad_by_freq)

    def _delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """(alpha / r) · (B A)ᵀ[x] = (alpha / r) · Aᵀ[x] Bᵀ; the padding row stays W's."""
        t, s = self.adapter_tensors(adapter), self.base_skeleton
        after_a = F.embedding(x, t["lora_A"].T, s.padding_idx, scale_grad_by_freq=s.scale_grad_by_freq)
        return after_a @ t["lora_B"].T * self.configs[adapter].scaling  # (..., r) @ (r, dim) -> (..., dim)


class LoRAConv(LoRALayer):
    """nn.Conv1d/2d/3d with a frozen W (out, in, *kernel) plus A, a convolution like the base's with r output
    channels, then B, a 1×1 one: ΔW = scaling · B ∘ A has W's shape. Args: as LoRALinear; use_dora is refused."""
    torch_bases, kind = (nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"

    @classmethod
    def check(cls, base: nn.Module, name: str) -> None:
        if base.groups > 1:
            raise TypeError(f"{name} is a {type(base).__name__} with groups={base.groups}: B ∘ A is a dense (out, in, "
                            f"*kernel) update that its grouped weight (out, in / {base.groups}, *kernel) cannot hold, "
                            "so it could not merge; leave it out of targets and adapt the ungrouped convolutions "
                            "beside it (the 1×1 ones)")

    @classmethod
    def shapes(cls, base: nn.Module, r: int) -> tuple[tuple, tuple]:
        """A (r, in, *kernel), B 1×1: (out, r, 1, ...)."""
        out, *rest = cls.weight_of(base).shape
        return (r, *rest), (out, r, *[1] * (len(rest) - 1))

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_skeleton._conv_forward(x, self.weight, self.bias)  # its stride, padding (mode), dilation

    def _delta(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        t, c = self.adapter_tensors(adapter), self.configs[adapter]
        x_drop = F.dropout(x, c.dropout, self.training) if c.dropout > 0 else x
        u = self.base_skeleton._conv_forward(x_drop.to(t["lora_A"].dtype), t["lora_A"], None)  # (N, r, *size')
        return (F.conv1d, F.conv2d, F.conv3d)[u.dim() - 3](u, t["lora_B"]) * c.scaling  # 1×1: -> (N, out, *size')


class LoRAMultiheadAttention(LoRALayer):
    """nn.MultiheadAttention with A (r, E), B (3E, r) over in_proj_weight (3E, E: Wq, Wk, Wv stacked) and a
    LoRALinear as out_proj, as PEFT. The module reads its weights itself (its fast path too), so forward runs its
    own forward with W + ΔW in their place: every path (training, eval, fast path, need_weights, masks) computes
    what the module computes with the adapted weights, and gradients reach A and B. Dropout does not apply (as in
    PEFT): the update is in W. In a mixed batch, each adapter's examples run as a sub-batch. Args: as LoRALinear;
    use_dora is refused."""
    torch_bases, kind = (nn.MultiheadAttention,), "mha"
    weight = property(lambda self: self.in_proj_weight)  # W: (3E, E)
    bias = property(lambda self: self.in_proj_bias)  # (3E,) or None

    @classmethod
    def check(cls, base: nn.Module, name: str) -> None:
        if not base._qkv_same_embed_dim:
            raise TypeError(f"{name} is an nn.MultiheadAttention with kdim or vdim unlike embed_dim, so q, k and v "
                            "have separate weights; lora.py (as PEFT) adapts the packed in_proj_weight: leave it out "
                            "of targets")
        check_base(base.out_proj, f"{name}'s out_proj")

    @classmethod
    def weight_of(cls, base: nn.Module) -> torch.Tensor:
        return base.in_proj_weight

    def __init__(self, base: nn.MultiheadAttention, *args, **kwargs):
        super().__init__(base, *args, **kwargs)
        self.out_proj = LoRALinear(base.out_proj, *args, **kwargs)

    def add_adapter(self, adapter: str, config: LoRAConfig, stacklevel: int = 3) -> None:
        super().add_adapter(adapter, config, stacklevel + 1)
        if "out_proj" in self._modules:
            self.out_proj.add_adapter(adapter, config, stacklevel + 1)

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.out_proj.delete_adapter(adapter)

    def __getattr__(self, name: str):  # embed_dim, batch_first, ...: what PyTorch's layers read off self_attn
        base = self.__dict__.get("base_skeleton")
        if base is not None and (name in base.__dict__ or hasattr(type(base), name)):
            return getattr(base, name)
        return super().__getattr__(name)

    def _run(self, adapters: tuple[str, ...], args, kwargs):
        weights = {n: p for n, p in self._parameters.items() if p is not None and n not in ADAPTER_NAMES}
        weights |= {"in_proj_weight": self._adapted_weight(adapters),
                    "out_proj.weight": self.out_proj._adapted_weight(adapters), "out_proj.bias": self.out_proj.bias}
        return torch.func.functional_call(self.base_skeleton.train(self.training), weights, args, kwargs)

    def forward(self, *args, **kwargs):
        """nn.MultiheadAttention's forward, with W + ΔW for in_proj_weight and out_proj.weight."""
        self._check_not_training_merged()
        self.out_proj._check_not_training_merged()
        if self.per_example is None or self.merged or not self.enabled:
            return self._run(self._active(), args, kwargs)
        a = inspect.signature(nn.MultiheadAttention.forward).bind(self, *args, **kwargs)
        a.apply_defaults()
        a = {k: v for k, v in a.arguments.items() if k != "self"}
        dim, (_, n, groups) = (0 if self.batch_first else 1), self.per_example
        if a["query"].dim() != 3 or a["query"].shape[dim] != n:
            raise ValueError(f"adapter_per_example was given {n} names, but this attention's query has shape "
                             f"{tuple(a['query'].shape)} (batch_first={self.batch_first}): a batch of {n} is needed")
        every = torch.arange(n, device=a["query"].device)
        rest = every[~torch.isin(every, torch.cat([every[:0], *groups.values()]))]  # the base's examples
        parts = [((ad,), rows) for ad, rows in groups.items()] + [((), rest)]
        outs, order = [], []
        for adapters, rows in (p for p in parts if len(p[1])):  # each adapter's examples, then the base's
            qkv = {id(a[k]): a[k] for k in ("query", "key", "value")}  # q, k, v that are one tensor stay one:
            picked = {i: t.index_select(dim, rows) for i, t in qkv.items()}  # its packed projection
            sub = a | {k: picked[id(a[k])] for k in ("query", "key", "value")}
            if a["key_padding_mask"] is not None:
                sub["key_padding_mask"] = a["key_padding_mask"].index_select(0, rows)
            if a["attn_mask"] is not None and a["attn_mask"].dim() == 3:  # (N · heads, L, S)
                sub["attn_mask"] = a["attn_mask"].view(n, -1, *a["attn_mask"].shape[1:]).index_select(0, rows) \
                    .flatten(0, 1)
            outs.append(self._run(adapters, (), sub))
            order.append(rows)
        back = torch.argsort(torch.cat(order))  # the rows of the concatenated sub-batches, back in batch order
        out = torch.cat([o for o, _ in outs], dim).index_select(dim, back)
        return out, None if outs[0][1] is None else torch.cat([w for _, w in outs]).index_select(0, back)


LAYERS = (LoRALinearNF4, LoRAConv1D, LoRALinear, LoRAEmbedding, LoRAConv, LoRAMultiheadAttention)  # first match wins


def layer_class(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that wraps `module` (the first in LAYERS that accepts it), or None."""
    return next((cls for cls in LAYERS if cls.accepts(module)), None)


def _check_combination(adapters: Iterable[str], configs: dict[str, LoRAConfig]) -> None:
    if len(adapters := list(adapters)) > 1 and (dora := [a for a in adapters if configs[a].use_dora]):
        raise ValueError(f"adapters {dora} use DoRA, whose magnitude rescales the whole adapted weight: it cannot be "
                         f"summed with others ({adapters}); use it alone")


# ─── adding and freezing ──────────────────────────────────────────────────────────────────────────────────────

def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """(qualified name, layer) for every LoRA layer in the model, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer))


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(dict.fromkeys(a for _, layer in lora_layers(model) for a in layer.configs))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _matches(name: str, pattern: str) -> bool:
    """An exact qualified name, a dotted end of it (as PEFT matches: "attention.output.dense"), or a glob."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _select(model: nn.Module, patterns, what: str) -> list[str]:
    """The module names matched by `patterns` (a name or a list of them), in module order; each must match one."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"{what} must be a non-empty name or a non-empty list of them, got {patterns!r}")
    names = [n for n, _ in model.named_modules() if n]
    wrappable = [n for n, m in model.named_modules() if layer_class(m) or isinstance(m, LoRALayer)]
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


def check_target(model: nn.Module, name: str, use_dora: bool = False, adapter: str = DEFAULT, why: str = "",
                 owners: dict | None = None) -> None:
    """Raise unless module `name` of the model can take adapter `adapter` so that it counts and merges exactly:
    a layer lora.py wraps, or a LoRA layer without that adapter."""
    if not name:
        raise ValueError(f"the model itself is a {type(model).__name__}: add_lora wraps layers inside a model; "
                         "wrap this one with LoRALinear(layer, r) (or LoRAEmbedding), or put it in an nn.Sequential")
    module, parent = model.get_submodule(name), model.get_submodule(name.rpartition(".")[0])
    label = f"module {name!r}{why}"
    if isinstance(parent, (nn.MultiheadAttention, LoRAMultiheadAttention)):
        raise TypeError(f"{label} is the out_proj of an nn.MultiheadAttention, which reads its weight directly and "
                        f"would ignore an adapter there; target the attention itself ({name.rpartition('.')[0]!r}): "
                        "lora.py adapts its in_proj and out_proj together")
    if isinstance(module, LoRALayer):
        if adapter in module.configs:
            check_base(module, name=label)  # raises: already carries LoRA
        if use_dora:
            _check_dora(type(module), module, label)
        return
    check_base(module, name=label, use_dora=use_dora)
    if tied := [n for n in (owners or _owners(model)).get(id(layer_class(module).weight_of(module)), []) if n != name]:
        raise ValueError(f"{label} ({type(module).__name__}) shares its weight with {tied} (tied weights): merging "
                         f"would change both. Leave it out of targets, or untie it first, e.g. "
                         f"model.{name}.weight = nn.Parameter(model.{name}.weight.detach().clone())")


def add_lora(model: nn.Module, r: int | None = None, alpha: float | None = None,
             targets: str | Iterable[str] | None = None, dropout: float = 0.0, init: str = "kaiming",
             use_rslora: bool = False, use_dora: bool = False, adapter_dtype: torch.dtype | None = None, *,
             adapter: str = DEFAULT, config: LoRAConfig | None = None) -> list[str]:
    """Wrap the target layers in place (freezing their weights); return the wrapped names in module order.

    Args:
        r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype: the adapter's settings, each explained at its
            LoRAConfig field (paper sections cited); or config: a LoRAConfig. PEFT's default is alpha = 8: pass
            alpha=8 to match a LoraConfig that does not set lora_alpha.
        targets: None takes every nn.Linear, Conv1D, nn.Conv1d/2d/3d and nn.MultiheadAttention but the module
            model.get_output_embeddings() returns (on a transformer: PEFT's target_modules="all-linear"), and warns
            naming the kinds of layer it left out. Else a name or list of names, each an exact qualified name
            ("encoder.0.query"), its dotted end as in PEFT ("query") or a glob ("layers.*.attn.q_proj"); these may
            also name nn.Embedding layers. Every target must match something, and all it matches must be wrappable.
        adapter: the adapter's name. The model's first adapter is active and trains; a later one (PEFT's
            add_adapter) is added beside the others, inactive and frozen, until set_adapter picks it.
    """
    config = config or LoRAConfig(r, alpha, dropout, init, use_rslora, use_dora, adapter_dtype)
    _check_adapter_name(adapter)
    modules = dict(model.named_modules())
    layers = dict(lora_layers(model))
    if targets is None and any(adapter in layer.configs for layer in layers.values()):
        raise ValueError(f"model already carries LoRA layers with adapter {adapter!r}; add_lora(targets=None) would "
                         f"stack a second adapter on them: {list(layers)}; name the new layers in targets, or pass "
                         "adapter='another_name' for a second adapter")
    owners = _owners(model)
    if targets is None:
        get_out = getattr(model, "get_output_embeddings", None)
        output = get_out() if callable(get_out) else None
        names, left_out, why_checked = [], {}, ""
        for n, m in modules.items():
            if any(n.startswith(f"{lay}.") for lay in layers):  # inside a LoRA layer: its adapters, its out_proj
                continue
            kind = type(m) if isinstance(m, LoRALayer) else layer_class(m)
            base, cls = (m.base_skeleton if isinstance(m, LoRALayer) else m), type(m).__name__
            why = (f"{cls} with groups > 1" if kind is LoRAConv and base.groups > 1 else
                   f"{cls} with kdim or vdim" if kind is LoRAMultiheadAttention and not base._qkv_same_embed_dim else
                   f"{cls} (use_dora=True)" if config.use_dora and kind not in (None, LoRALinear, LoRAEmbedding) else
                   cls if kind is None and not m._modules and any(
                       p is not None and p.dim() > 1 for p in m._parameters.values()) else None)
            if why:
                left_out[why] = left_out.get(why, 0) + 1
            elif kind not in (None, LoRAEmbedding) and m is not output and \
                    not isinstance(modules[n.rpartition(".")[0]], nn.MultiheadAttention):  # its out_proj: with it
                names.append(n)
        if left_out:
            warnings.warn(f"targets=None left out layers that lora.py does not wrap, by kind and count: {left_out}; "
                          "name one in targets to see why", stacklevel=2)
        if not names:
            raise ValueError(f"model ({type(model).__name__}) has no layer that targets=None takes; {SUPPORTED}")
    else:
        names, why_checked = _select(model, targets, "target"), " (matched by targets)"
    for n in names:
        check_target(model, n, config.use_dora, adapter, why=why_checked, owners=owners)
    for n in names:  # all checks passed: now change the model
        wrap(model, n, config, adapter)
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


def wrap(model: nn.Module, name: str, config: LoRAConfig, adapter: str = DEFAULT) -> LoRALayer:
    """Wrap module `name` (its exact qualified name) with adapter `adapter`, or add that adapter to the LoRA layer
    there; returns the layer. The model's first adapter is active and trains; a later one is added inactive and
    frozen (as PEFT's add_adapter). It checks only what the layer checks: call check_target first (add_lora does)."""
    module, others = model.get_submodule(name), [a for a in adapter_names(model) if a != adapter]
    if isinstance(layer := module, LoRALayer):
        layer.add_adapter(adapter, config)
    else:
        layer = layer_class(module)(module, config=config, adapter=adapter)
    for part in [m for m in layer.modules() if isinstance(m, LoRALayer)] if others else []:
        part.active = next(lora_layers(model))[1].active
        for p in part.adapter_tensors(adapter).values():
            p.requires_grad_(False)
    if layer is module:
        return layer
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


def _adapter_list(model: nn.Module, adapters, what: str = "adapter") -> list[str]:
    """A name or a list of names, each one of the model's adapters."""
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    have = adapter_names(model)
    if not names or len(set(names)) < len(names) or (unknown := [a for a in names if a not in have]):
        raise ValueError(f"{what} must be one of the model's adapters {have} or a list of distinct ones, got "
                         f"{adapters!r}")
    return names


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none",
                                modules_to_save: str | Iterable[str] | None = None,
                                adapters: str | Iterable[str] | None = None) -> None:
    """Freeze every parameter except the adapters' (and biases: "all" of them, or "lora_only"), and except
    the modules in `modules_to_save` (PEFT's name), which train in full: a new task's head, new embeddings.
    They are given by name as add_lora's targets; lora_state_dict saves them. `adapters`: the adapters that
    train, None for the active ones (a mixed batch trains several: name them)."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    chosen = None if adapters is None else _adapter_list(model, adapters, "adapters")
    full = [] if modules_to_save is None else _select(model, modules_to_save, "modules_to_save")
    if lora := [n for n in full if isinstance(model.get_submodule(n), LoRALayer)]:
        raise ValueError(f"modules_to_save {lora} carry LoRA: a layer is either adapted or trained in full; name it "
                         "in add_lora's targets or in modules_to_save, not both")
    for name, p in model.named_parameters():
        p.requires_grad_(bias == "all" and name.rsplit(".", 1)[-1] == "bias")
    for _, layer in lora_layers(model):
        for a in (layer._active() if chosen is None else [a for a in chosen if a in layer.configs]):
            for p in layer.adapter_tensors(a).values():
                p.requires_grad_(True)
        if bias == "lora_only" and layer.bias is not None:
            layer.bias.requires_grad_(True)
    for n in full:
        model.get_submodule(n).requires_grad_(True)


def trained_biases(model: nn.Module) -> list[str]:
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


# ─── several adapters ─────────────────────────────────────────────────────────────────────────────────────────

def _model_configs(model: nn.Module) -> dict[str, LoRAConfig]:
    return {a: c for _, layer in lora_layers(model) for a, c in layer.configs.items()}


def set_adapter(model: nn.Module, adapter: str | Iterable[str]) -> None:
    """Make `adapter` (a name, or a list whose updates are summed, as PEFT) the active one(s) on every layer; they
    train, the others are frozen (as PEFT's set_adapter)."""
    names = _adapter_list(model, adapter)
    _check_combination(names, _model_configs(model))
    layers = list(lora_layers(model))
    if merged := [n for n, layer in layers if layer.merged]:
        raise RuntimeError(f"layers {merged} are merged with their active adapters: unmerge() them first")
    for _, layer in layers:
        layer.active = tuple(names)
        for a in layer.configs:
            for p in layer.adapter_tensors(a).values():
                p.requires_grad_(a in names)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove adapter `adapter` from every layer; a layer left without adapters gives back its base module. If it
    was active, the other active ones stay (none: the model computes the base model's output)."""
    _adapter_list(model, adapter)
    layers = list(lora_layers(model))
    if merged := [n for n, layer in layers if layer.merged and adapter in layer.merged_adapters]:
        raise RuntimeError(f"adapter {adapter!r} is merged into layers {merged}: unmerge() them first")
    for name, layer in layers:
        if adapter in layer.configs:
            layer.delete_adapter(adapter)
        if not layer.configs:
            _set_submodule(model, name, layer.unwrapped())
    if next(lora_layers(model), None) is None:
        _restore_fast_paths(model)


@contextlib.contextmanager
def adapter_per_example(model: nn.Module, names: Iterable[str | None], batch_dim: int = 0):
    """Inside: example i of the batch goes through adapter names[i] alone (None: the base model), for inference and
    training; each adapter's gradient is the one its own examples give. Args: names, one per example; batch_dim:
    the inputs' batch dimension (1 for nn.TransformerEncoder without batch_first). Linear layers stack the
    adapters' A and B into one product while their ranks sum to at most STACK_MAX_RANK; beyond, and in other
    layers, each adapter's examples are a sub-batch. DoRA adapters are refused (their norm is per adapter)."""
    names = list(names)
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layers: call lora.add_lora first")
    configs = _model_configs(model)
    if not names or (unknown := sorted({a for a in names if a is not None and a not in configs})):
        raise ValueError(f"names must hold one adapter name (or None, the base model) per example; the model's "
                         f"adapters are {list(configs)}, got {names if not names else unknown}")
    if dora := sorted({a for a in names if a is not None and configs[a].use_dora}):
        raise ValueError(f"adapters {dora} use DoRA, whose weight norm belongs to the whole batch's adapter: run "
                         "their examples as a batch of their own after set_adapter")
    if any(layer.merged for layer in layers) or any(layer.per_example is not None for layer in layers):
        raise RuntimeError("adapter_per_example needs unmerged layers, outside another adapter_per_example")
    rows = {a: [i for i, n in enumerate(names) if n == a] for a in dict.fromkeys(names) if a is not None}
    try:
        for layer in layers:
            layer.per_example = (batch_dim, len(names), {a: torch.tensor(r, device=layer.weight.device)
                                                         for a, r in rows.items() if a in layer.configs})
        yield model
    finally:
        for layer in layers:
            layer.per_example = None


# ─── saving and loading ───────────────────────────────────────────────────────────────────────────────────────

def lora_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor that fine-tuning trained, and what load_lora_state_dict needs to rebuild the wrapping.

    Tensors only, so torch.load(weights_only=True) and safetensors both carry it:
    - each LoRA layer's `<path>.lora_A`, `<path>.lora_B` (and DoRA's `<path>.lora_magnitude`) of `adapter`
      (None: the model's only adapter), named so whatever its name, whose shapes give r and whose dtype is the
      adapter dtype, and 0-dim `<path>.lora_alpha`, `<path>.lora_use_rslora`, `<path>.lora_dropout`;
    - every other parameter that requires grad under its state_dict name (trained biases, the modules of
      mark_only_lora_as_trainable(modules_to_save=...)), with the buffers of modules that train in full.
    ValueError if the model has no LoRA layers.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layers to save: call lora.add_lora first")
    names = adapter_names(model)
    adapter = names[0] if adapter is None and len(names) == 1 else adapter  # None: the model's only adapter
    if adapter not in names:
        raise ValueError(f"adapter must name one of the model's adapters {names}, got {adapter!r}")
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    adapters = {id(p) for _, layer in layers for a in layer.configs for p in layer.adapter_tensors(a).values()}
    keys = {id(p): f"{n}.{k}" for n, layer in layers if adapter in layer.configs
            for k, p in layer.adapter_tensors(adapter).items()}
    full = [n for n, m in model.named_modules() if not isinstance(m, (LoRALayer, _Adapter)) and
            (own := list(m.parameters(recurse=False))) and all(p.requires_grad for p in own)]
    buffers = {f"{n}.{b}" if n else b for n in full for b, _ in model.get_submodule(n).named_buffers(recurse=False)}
    state = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in keys:
            state[keys[id(v)]] = v.detach()
        elif id(v) not in adapters and (k in buffers or id(v) in trained):
            state[k] = v.detach()
    for name, c in ((n, layer.configs[adapter]) for n, layer in layers if adapter in layer.configs):
        state[f"{name}.lora_alpha"] = torch.tensor(c.alpha, dtype=torch.float64)
        state[f"{name}.lora_use_rslora"] = torch.tensor(c.use_rslora)
        state[f"{name}.lora_dropout"] = torch.tensor(c.dropout, dtype=torch.float64)
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
def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], adapter: str = DEFAULT) -> list[str]:
    """Load what lora_state_dict saved as adapter `adapter`; returns the LoRA layers' names.

    Into a model without that adapter, it wraps the saved layers itself (or adds the adapter to LoRA layers) with
    their saved settings, as add_lora would (a later adapter is inactive and frozen). Into a model with it, its
    layers must be the saved ones. Keys, then shapes, then settings are checked before anything changes; a mismatch
    raises, saying which and how to fix it. Files from older lora.py versions (no `lora_dropout`) load into a
    model wrapped by hand with the same add_lora call.
    """
    _check_adapter_name(adapter)
    saved, first = _saved_layers(state_dict), not adapter_names(model)
    own = {n: layer for n, layer in lora_layers(model) if adapter in layer.configs}
    modules = dict(model.named_modules())
    if not saved:
        raise KeyError("the state_dict holds no lora_A / lora_B tensors: it is not an adapter from lora_state_dict")
    tops = [p for p in saved if not (p.rpartition(".")[0] in saved and isinstance(  # an out_proj comes with it
        modules.get(p.rpartition(".")[0]), (nn.MultiheadAttention, LoRAMultiheadAttention)))]
    if own and set(own) != set(saved):
        raise KeyError(f"the model's LoRA layers are not the adapter's: the model lacks {sorted(set(saved) - set(own))}"
                       f", the adapter lacks {sorted(set(own) - set(saved))} (was add_lora called with the same "
                       "targets?) Or load into a model without LoRA, which is then wrapped as the adapter was.")
    configs = {}
    if not own:
        if old := [p for p, got in saved.items() if "lora_dropout" not in got]:
            raise ValueError(f"layers {old} were saved by an older lora.py that did not record dropout: call "
                             "add_lora(model, ...) with the settings they were trained with, then load")
        if absent := [p for p in saved if p not in modules]:
            raise KeyError(f"the adapter has layers {absent}, which the model lacks: load it into the model it was "
                           "trained on")
        owners = _owners(model)
        for path, got in saved.items():
            s = _layer_settings(got)
            if path in tops:
                check_target(model, path, s["use_dora"], adapter, why=" (in the adapter)", owners=owners)
            try:
                configs[path] = LoRAConfig(**s)
            except ValueError as e:
                raise ValueError(f"layer {path!r} of the adapter: {e}") from None
    others = {k: v for k, v in state_dict.items() if k.rpartition(".")[2] not in ADAPTER_NAMES + SETTINGS}
    params = model.state_dict()
    if unexpected := sorted(k for k in others if k not in params):
        raise KeyError(f"adapter state_dict does not fit this model: unexpected keys {unexpected}; load it into the "
                       "model it was trained on")
    for path, got in saved.items():  # shapes first: this layer's r if wrapped, else the adapter's
        m = own.get(path, modules[path])
        r = own[path].configs[adapter].r if own else got["lora_A"].shape[0]
        a_shape, b_shape = (type(m) if isinstance(m, LoRALayer) else layer_class(m)).shapes(m, r)
        want = {"lora_A": a_shape, "lora_B": b_shape, "lora_magnitude": b_shape[:1]}
        if bad := [k for k in ADAPTER_NAMES if k in got and tuple(got[k].shape) != tuple(want[k])]:
            raise ValueError(f"layer {path!r}: the adapter's {bad[0]} has shape {tuple(got[bad[0]].shape)}, but this "
                             f"layer at r={r} needs {want[bad[0]]} (the adapter has r={got['lora_A'].shape[0]}: "
                             "add_lora with that r, or load into a model without LoRA)")
    if bad := [k for k, v in others.items() if v.shape != params[k].shape]:
        raise ValueError(f"shape mismatch for {bad[0]!r}: state_dict has {tuple(others[bad[0]].shape)}, "
                         f"model has {tuple(params[bad[0]].shape)}")
    for path, layer in own.items():  # then settings
        got, c = _layer_settings(saved[path]), layer.configs[adapter]
        have = dict(dataclasses.asdict(c), adapter_dtype=layer.adapter_tensors(adapter)["lora_A"].dtype)
        if diff := {k: (got[k], have[k]) for k in got if got[k] is not None and got[k] != have[k]}:
            raise ValueError(f"layer {path!r}: the adapter was saved with {({k: v[0] for k, v in diff.items()})}, "
                             f"this layer has {({k: v[1] for k, v in diff.items()})}: call add_lora with the "
                             "adapter's settings, or load into a model without LoRA")
    if merged := [n for n, layer in own.items() if layer.merged]:
        raise RuntimeError(f"cannot load an adapter into merged layers {merged}: unmerge() them first")
    if not own:  # all checks passed: now change the model, and let train what trained
        for path in (n for n in modules if n in tops):
            wrap(model, path, configs[path], adapter)
        own = {n: layer for n, layer in lora_layers(model) if adapter in layer.configs}
        for n, p in model.named_parameters() if first else ():
            p.requires_grad_(n.rpartition(".")[2] in ADAPTER_NAMES or n in others)
    for path, got in saved.items():
        for k, t in own[path].adapter_tensors(adapter).items():
            t.copy_(got[k])
    for k, v in others.items():
        params[k].copy_(v)
    return list(own)


# ─── merging ──────────────────────────────────────────────────────────────────────────────────────────────────

def merge_lora(model: nn.Module, adapter: str | Iterable[str] | None = None) -> nn.Module:
    """Replace every LoRA layer by the module it wrapped (its class and settings), holding the weight adapted by
    `adapter` (a name or a list, summed; None: the active adapters), merged in place (no second copy of W); the
    other adapters are dropped; returns the model. Every layer is checked before any is changed, so a diverged
    adapter leaves the model as it was. The weights must be whole tensors: under FSDP2, merge an unsharded copy
    loaded from a full state dict. (merge states the rounding.) Merge before Hugging Face's save_pretrained: it
    saves W and drops the adapters.
    """
    chosen = None if adapter is None else tuple(_adapter_list(model, adapter))
    if chosen is not None:
        _check_combination(chosen, _model_configs(model))
    layers = list(lora_layers(model))
    for name, layer in layers:
        try:
            layer.merged_weight(chosen)
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from None
    for name, layer in layers:
        _set_submodule(model, name, layer.merged_module(chosen))
    _restore_fast_paths(model)
    return model


def _restore_fast_paths(model: nn.Module) -> None:
    """No adapter remains: PyTorch's fast path again, where wrap switched it off."""
    for m in model.modules():
        m.__dict__.update(m.__dict__.pop("lora_fast_path_flags", {}))


# ─── switching off ────────────────────────────────────────────────────────────────────────────────────────────

@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Inside: the model computes the base model's output: exactly on unmerged layers; merged layers are
    unmerged in place (up to merge's rounding) and merged again on exit. On exit: as before."""
    state = [(layer, layer.enabled, layer.merged) for _, layer in lora_layers(model)]
    try:
        for layer, _, _ in state:
            layer.unmerge()
            layer.enabled = False
        yield model
    finally:
        for layer, enabled, merged in state:
            layer.enabled = enabled
            if merged:
                layer.merge()

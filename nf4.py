"""
NF4, the 4-bit NormalFloat of QLoRA, in one file that imports only torch: copy it into your project and use it.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314) stores the frozen
base weights in 4 bits and trains LoRA adapters in 16 or 32 bits on top. This file stores them exactly as
bitsandbytes does (the same bytes, the same scales, the same dequantized values: tests/test_nf4.py checks each).

The 16 values (paper, section 3, "4-bit NormalFloat")
    Pretrained weights are close to normal, so the 16 levels are quantiles of N(0, 1): the most levels where the
    most weights are, with equal probability mass between neighbours within each half (8 levels above 0 and 7 below
    share the same range of p, so the gaps hold 0.0585 and 0.0668). Symmetric quantiles would have no exact zero
    (16 is even), yet zero must stay zero (padding, pruned weights), so the two halves are built apart:

        8 positive:  Φ⁻¹(p) for p = 8 evenly spaced points from 0.9677083 down to (not including) 0.5
        7 negative: -Φ⁻¹(p) for p = 7 evenly spaced points from 0.9677083 down to (not including) 0.5
        and 0.

    then divided by the largest, so they span [-1, 1] (the 0.9677083 is bitsandbytes': it sets how far into the
    tails ±1 sits, Φ⁻¹(0.9677083) ≈ 1.848). NF4_CODEBOOK below; rounded:
        -1, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0, 0.080, 0.161, 0.246, 0.338, 0.441, 0.563, 0.723, 1

Blocks (absmax quantization, one scale per block)
    The weight is flattened (row-major) and cut into blocks of 64 consecutive values; the last one may be shorter.
    Each block is divided by its largest |value| (its absmax, float32), so it lies in [-1, 1], and each value goes
    to the nearest of the 16 levels, its 4-bit code 0..15. Nearest = between the midpoints of neighbouring levels;
    a value exactly on a midpoint goes to the lower level (torch.bucketize's right=False, bitsandbytes' rule).

        W (out, in) ──flatten──► | block 0: w0 … w63 | block 1: w64 … w127 | … | last block (≤ 64) |
                                   absmax[0]            absmax[1]                  absmax[-1]
        w ≈ NF4_CODEBOOK[code] · absmax[block]

Bytes (two codes per byte, the first element in the high nibble)
        element:  w0     w1     w2     w3    …
        code:     c0     c1     c2     c3
        packed:   [c0 << 4 | c1]  [c2 << 4 | c3]  …     an odd count is padded with the code of 0 (7)

Double quantization (paper, section 3, "Double Quantization")
    One float32 per 64 weights is 32/64 = 0.5 bits per parameter. So the absmax values are quantized too: their
    mean (the `absmax_offset`, float32) is subtracted, and the rest, in blocks of 256, is quantized to 8 bits the
    same way (divide by the block's largest |value|, the `absmax_scale`, float32; nearest level, ties down) over
    bitsandbytes' 8-bit dynamic map (DYNAMIC_CODEBOOK: 0, 1, and for each decade 10⁻⁶ … 10⁰ a linear grid of
    1, 2, 4, …, 64 values, both signs: fine near zero, coarse near one). Nearest as bitsandbytes' torch kernel
    rounds; its native CPU kernel searches approximately and lands a few of these codes off (tests/test_nf4.py).

Bits per parameter
        plain:                4 + 32/64                        = 4.5
        double quantization:  4 + 8/64 + 32/(64·256)  ≈ 4.127   (+ 32 bits for the offset, once per weight)
    against 16 for bfloat16: a 3.9x smaller base.

Precision: quantizing computes in float32 whatever the weight's dtype; dequantizing multiplies level by scale in
float32 and rounds once into the dtype asked for.

    import nf4
    q = nf4.quantize_nf4(layer.weight)               # q.packed: uint8, two codes per byte
    w = nf4.dequantize_nf4(q)                        # W's shape and dtype again, 4-bit close
    nf4.quantize_model(model)                        # every nn.Linear but the head -> LinearNF4, in place
    lora.add_lora(model, r=8, targets=["query", "value"])   # QLoRA: lora.py wraps LinearNF4
"""

import fnmatch
import functools
import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

ABSMAX_BLOCKSIZE = 256  # double quantization: the absmax values are quantized in blocks of 256
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' choices for 4 bits
HEADS = ("lm_head", "classifier", "score", "head")  # quantize_model's default keeps these in full precision


# ─── the two codebooks ────────────────────────────────────────────────────────────────────────────────────────

def normal_float_codebook(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels, (16,) float32, ascending: 7 negative, an exact 0, 8 positive quantiles of N(0, 1),
    divided by the largest so that they span [-1, 1]. The quantiles are taken in float64 at float32 points, as
    bitsandbytes' create_normal_map does, then rounded to float32 before the division."""
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())   # 8 values, Φ⁻¹(offset) first
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())  # 7 values
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


def dynamic_codebook() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, (256,) float32, ascending: 0, 1, and for decade i = 0 … 6 the
    2^i midpoints of a linear grid over [0.1, 1], times 10^(i - 6), with both signs (2·127 + 2 = 256 values)."""
    values = [0.0, 1.0]
    for i in range(7):
        grid = torch.linspace(0.1, 1, 2 ** i + 1)  # float32, as bitsandbytes builds it
        mids = (grid[:-1] + grid[1:]) / 2.0
        values += (10.0 ** (i - 6) * mids).tolist() + (-(10.0 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


NF4_CODEBOOK = normal_float_codebook()
DYNAMIC_CODEBOOK = dynamic_codebook()


@functools.cache
def _on(codebook: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, midpoints between neighbours) on `device`, made once per device."""
    levels = {"nf4": NF4_CODEBOOK, "dynamic": DYNAMIC_CODEBOOK}[codebook].to(device)
    return levels, (levels[:-1] + levels[1:]) / 2


# ─── quantizing and dequantizing ──────────────────────────────────────────────────────────────────────────────

def _scale_blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n,) float32 -> (absmax (blocks,), x / absmax clamped to [-1, 1] (n,)), rounding as bitsandbytes:
    whole blocks multiply by the reciprocal 1 / max(absmax, 1e-38) (an all-zero block keeps absmax 0); the
    shorter last block divides by max(absmax, 1e-38) (and stores that)."""
    full = x.numel() - x.numel() % blocksize
    body = x[:full].view(-1, blocksize)                                  # (blocks, blocksize)
    absmax = body.abs().amax(dim=1)                                      # (blocks,)
    scaled = (body * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).view(-1)
    if full < x.numel():
        tail_max = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_max).clamp(-1, 1)])
    return absmax, scaled


def _nearest(scaled: torch.Tensor, codebook: str) -> torch.Tensor:
    """The index of the nearest level, uint8: bucketize over the midpoints (ties to the lower level), one int32 per
    value, where an argmin over |x - level| would build a (n, levels) matrix."""
    levels, midpoints = _on(codebook, scaled.device)
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


class NF4Weight(nn.Module):
    """A weight stored in NF4: what quantize_nf4 returns and what LinearNF4 keeps as its `weight`.

    Buffers (its state dict): `packed` uint8 (ceil(n/2),), two codes per byte; `absmax`, one scale per block:
    float32 (blocks,), or with double quantization uint8 codes over DYNAMIC_CODEBOOK beside `absmax_scale`
    float32 (ceil(blocks/256),) and the 0-dim float32 `absmax_offset`. Attributes: `shape`, `dtype` (what
    dequantize() returns), `blocksize`, `double_quant`. Never trained: requires_grad is False.

    .to(device) moves the buffers; .to(dtype), .half() and the like change `dtype` alone: the stored form is fixed.
    """

    requires_grad = False  # read as a frozen weight's flag (lora_peft.py reads it)

    def __init__(self, shape: Iterable[int], dtype: torch.dtype = torch.float32, blocksize: int = 64,
                 double_quant: bool = True, device: torch.device | str | None = None):
        super().__init__()
        self.shape, self.dtype, self.blocksize, self.double_quant = torch.Size(shape), dtype, blocksize, double_quant
        n = self.shape.numel()
        blocks = -(-n // blocksize)
        self.register_buffer("packed", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scale", torch.zeros(-(-blocks // ABSMAX_BLOCKSIZE), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, device=device))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, self.dequantize(), bias), keeping only the 4-bit form for backward (see _NF4Linear)."""
        return _NF4Linear.apply(x, bias, self)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, " \
               f"double_quant={self.double_quant}"

    def _apply(self, fn, recurse=True):
        # fn is what .to(), .cuda(), .half() ... apply to each tensor. On a uint8 probe it shows the device alone
        # (they convert floating tensors only), so the float32 scales move without being rounded; on a probe of
        # our dtype it shows the dtype asked for, which dequantize() then returns.
        device = fn(torch.empty(0, dtype=torch.uint8, device=self.device)).device
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self.device)).dtype
        for name, buf in self._buffers.items():
            self._buffers[name] = buf.to(device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, buf in self._buffers.items():  # copy_ would cast silently: float scales into uint8 codes
            got = state_dict.get(prefix + name)
            if got is not None and got.dtype != buf.dtype:
                error_msgs.append(f"{prefix}{name} is {got.dtype}, this NF4Weight (double_quant="
                                  f"{self.double_quant}) stores {buf.dtype}: was it saved with another double_quant?")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _NF4Linear(torch.autograd.Function):
    """x Wᵀ + b with W dequantized in forward and again in backward, as bitsandbytes' MatMul4Bit does: autograd
    would otherwise keep every layer's full-precision W alive from its forward to its backward, and a model's
    training step would hold as much weight memory as without quantization. W never gets a gradient."""

    @staticmethod
    def forward(ctx, x, bias, weight):
        ctx.weight = weight
        return F.linear(x, weight.dequantize(), bias)  # (N, in) @ (in, out) + b -> (N, out)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.weight.dequantize().to(grad_out.dtype)  # under autocast forward ran in bf16, so grad_out is bf16
        grad_x = grad_out @ w if ctx.needs_input_grad[0] else None  # (N, out) @ (out, in); autograd casts to x's dtype
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize `weight` (float32, bfloat16 or float16, any shape) to NF4, as bitsandbytes' quantize_4bit(weight,
    blocksize, quant_type="nf4", compress_statistics=double_quant) does, byte for byte (the 8-bit absmax codes as
    its torch kernel rounds them: see the module docstring)."""
    if not isinstance(weight, torch.Tensor) or weight.dtype not in DTYPES:
        raise TypeError(f"weight must be a float32, bfloat16 or float16 tensor, got "
                        f"{weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if weight.numel() == 0:
        raise ValueError(f"weight has no elements (shape {tuple(weight.shape)})")
    q = NF4Weight(weight.shape, weight.dtype, blocksize, double_quant, device="meta")
    x = weight.detach().reshape(-1).float()                       # (n,) float32, whatever the dtype
    absmax, scaled = _scale_blocks(x, blocksize)                  # (blocks,), (n,) in [-1, 1]
    codes = _nearest(scaled, "nf4")                               # (n,) uint8 in 0 … 15
    del scaled
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=7)                     # the code of 0.0
    q.packed = (codes[0::2] << 4) | codes[1::2]                   # (ceil(n/2),): first element, high nibble
    if double_quant:
        q.absmax_offset = absmax.mean()                           # 0-dim float32
        q.absmax_scale, scaled = _scale_blocks(absmax - q.absmax_offset, ABSMAX_BLOCKSIZE)
        q.absmax = _nearest(scaled, "dynamic")                    # (blocks,) uint8 in 0 … 255
    else:
        q.absmax = absmax
    return q


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """The weight again, of q's shape and dtype: each level times its block's scale, in float32, rounded once."""
    absmax = q.absmax
    if q.double_quant:
        levels, _ = _on("dynamic", q.device)
        absmax = _blockwise_product(levels[absmax.int()], q.absmax_scale, ABSMAX_BLOCKSIZE) + q.absmax_offset
    levels, _ = _on("nf4", q.device)
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).view(-1)  # (2·ceil(n/2),) uint8
    n = q.shape.numel()
    return _blockwise_product(levels[codes[:n].int()], absmax, q.blocksize).view(q.shape).to(q.dtype)


def _blockwise_product(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (n,) float32, each times its block's scale (blocks,), in place where the blocks are whole."""
    full = values.numel() - values.numel() % blocksize
    values[:full].view(-1, blocksize).mul_(scales[:full // blocksize, None])
    if full < values.numel():
        values[full:].mul_(scales[-1])
    return values


# ─── the layer ────────────────────────────────────────────────────────────────────────────────────────────────

class LinearNF4(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4: forward dequantizes it to the compute dtype and applies
    F.linear, and backward dequantizes it again rather than keep it (as bitsandbytes). The bias stays in full
    precision (the compute dtype). lora.py wraps it (QLoRA).

    Args:
        in_features, out_features, bias: as nn.Linear.
        dtype: the compute dtype: what the weight dequantizes to, the bias's and the input's dtype.
        blocksize, double_quant: as quantize_nf4.

    state_dict(): `weight.packed`, `weight.absmax` (and `weight.absmax_scale`, `weight.absmax_offset`), `bias`:
    tensors only, for torch.load(weights_only=True); it loads into a LinearNF4 of the same shape and settings.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 blocksize: int = 64, double_quant: bool = True, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = NF4Weight((out_features, in_features), dtype, blocksize, double_quant, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None, blocksize: int = 64,
                    double_quant: bool = True) -> "LinearNF4":
        """Quantize `linear`'s weight (in its own dtype, as bitsandbytes does); compute in `compute_dtype`
        (None: the weight's dtype). The weight then dequantizes straight to the compute dtype: bitsandbytes'
        Linear4bit rounds to the stored dtype first, which differs only when the compute dtype is the wider one,
        or bfloat16 against float16."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got a {type(linear).__name__}")
        if type(linear).forward is not nn.Linear.forward:
            raise TypeError(f"{type(linear).__name__} has its own forward: its output is not F.linear of its weight")
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight = quantize_nf4(linear.weight, blocksize, double_quant)
        layer.weight.dtype = compute_dtype or linear.weight.dtype
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(layer.weight.dtype, copy=True), requires_grad=False)
        return layer.train(linear.training)

    def dequantized_weight(self) -> torch.Tensor:
        """W (out, in) in the compute dtype, as forward uses it."""
        return self.weight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)  # F.linear(x, W, b), W dequantized: (N, in) @ (in, out) + b

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.weight.dtype}, blocksize={self.weight.blocksize}, "
                f"double_quant={self.weight.double_quant}")


# ─── quantizing a model ───────────────────────────────────────────────────────────────────────────────────────

def _matches(name: str, pattern: str) -> bool:
    """An exact qualified name, a dotted end of it ("attention.self.query"), or a glob, as lora.add_lora's targets."""
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def _head(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def quantize_model(model: nn.Module, targets: str | Iterable[str] | None = None, compute_dtype: torch.dtype | None
                   = None, blocksize: int = 64, double_quant: bool = True) -> list[str]:
    """Replace nn.Linear layers by LinearNF4, in place; return their names in module order.

    targets=None takes every nn.Linear but the output head, which stays in full precision as in QLoRA: the module
    model.get_output_embeddings() returns where the model has that method (transformers' language models), else
    any whose last name is in HEADS ("lm_head", "classifier", "score", "head"); where neither names a head, the
    module that holds the model's last parameter, if it is an nn.Linear (as transformers' bitsandbytes
    integration keeps it), with a warning naming it. Linears inside an
    nn.MultiheadAttention or nn.TransformerEncoderLayer are left alone with a warning (those read their weights
    directly). Else `targets` is a name or a list, each an exact qualified name, its dotted end or a glob, as
    lora.add_lora's; every one must match something, and all they match must be a plain nn.Linear.
    Every check runs before anything changes.
    """
    modules = dict(model.named_modules())
    parents = {n: modules[n.rpartition(".")[0]] for n in modules if n}
    reads_weight = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    if targets is None:
        head = _head(model)
        names = [n for n, m in modules.items() if type(m) is nn.Linear and m is not head
                 and n.rpartition(".")[2] not in HEADS]
        last = next(reversed([n for n, _ in model.named_parameters()]), "").rpartition(".")[0]
        if head is None and not any(n.rpartition(".")[2] in HEADS for n in modules) and last in names:
            warnings.warn(f"quantize_model keeps {last!r} in full precision: the model names no output head "
                          f"(get_output_embeddings() or a name in {HEADS}), so, as transformers does, it keeps the "
                          "module of the last parameter; name it in targets to quantize it too", stacklevel=2)
            names.remove(last)
        if skipped := [n for n in names if isinstance(parents[n], reads_weight)]:
            warnings.warn(f"quantize_model leaves {skipped} alone: their parent reads their weight directly",
                          stacklevel=2)
            names = [n for n in names if n not in skipped]
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"targets must be None, a non-empty name or a list of them, got {targets!r}")
        for p in patterns:
            if not any(_matches(n, p) for n in modules if n):
                raise ValueError(f"target {p!r} matches no module; the nn.Linear layers are "
                                 f"{[n for n, m in modules.items() if isinstance(m, nn.Linear)]}")
        names = [n for n in modules if n and any(_matches(n, p) for p in patterns)]
        for n in names:
            if type(modules[n]) is not nn.Linear:
                raise TypeError(f"module {n!r} is a {type(modules[n]).__name__}; quantize_model quantizes nn.Linear "
                                "layers (a subclass may compute something else from its weight)")
            if isinstance(parents[n], reads_weight):
                raise TypeError(f"module {n!r} belongs to an {type(parents[n]).__name__}, which reads its weight "
                                "directly: a LinearNF4 there would not be used")
    if not names:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear to quantize")
    counts = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                counts[id(p)] = counts.get(id(p), 0) + 1
    if tied := [n for n in names if counts[id(modules[n].weight)] > 1]:
        raise ValueError(f"modules {tied} share their weight with another module (tied weights): quantizing one "
                         "would untie them; leave them out of targets")
    for n in names:  # all checks passed: now change the model
        setattr(parents[n], n.rpartition(".")[2],
                LinearNF4.from_linear(modules[n], compute_dtype, blocksize, double_quant))
    return names


def nf4_bytes(model: nn.Module) -> int:
    """Bytes of every NF4Weight's buffers in the model: the stored 4-bit weights and their scales."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Weight)
               for b in m.buffers())

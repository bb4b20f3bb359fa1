"""nf4.py: bit for bit against bitsandbytes, and its own properties.

The comparisons need bitsandbytes (a pinned test-only dependency, as peft) and skip, saying why, where it is absent;
the rest needs torch alone. This file imports nf4 and torch only (not lora, not experiments), so that nf4.py
copied alone with it into an empty folder passes it. CPU, seconds.

The reference for the double quantization's 8-bit codes. bitsandbytes quantizes the absmax values with its op
quantize_blockwise, which has two kernels for the CPU: its torch kernel (nearest level, ties to the lower one, as
for the 4-bit codes) and, when its native library loads, a C++ kernel that searches the 256 levels with a fast
approximate binary search (BinSearch's Direct2) and then lands up to a few levels off for about 1 absmax in 600
(test_native_cpu_kernel_is_not_always_nearest). nf4.py follows the torch kernel: in the comparisons below,
bitsandbytes' whole quantize_4bit / dequantize_4bit pipeline runs as usual, with its CPU quantize_blockwise pointed
at its own torch kernel for the duration of each test.
"""

import ast
import io
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Sizes that are and are not multiples of the 64-value block, and of the 256 blocks of the double quantization.
SHAPES = {
    "128 whole blocks, fewer than 256": (128, 64),
    "1024 whole blocks, a multiple of 256": (512, 128),
    "300 whole blocks, not a multiple of 256": (300, 64),
    "3300 values: 51 whole blocks and one of 36": (33, 100),
    "63 values: one short block, an odd count (a padding nibble)": (7, 9),
    "77000 values: 1203 whole blocks and one of 8": (1000, 77),
    "a single value": (1, 1),
    "12288 values: 192 whole blocks, rows of 96 (not a multiple of the block)": (128, 96),
    "10240 values: 160 whole blocks, rows of 160": (64, 160),
}
NO_BNB = "bitsandbytes is not installed (a test-only dependency: pip install -r requirements.txt); " \
         "the bit-for-bit comparisons with it are skipped"


@pytest.fixture
def bnb():
    """bitsandbytes.functional, its CPU quantize_blockwise and dequantize_4bit pointed at its own torch kernels
    (see the docstring), whose semantics are its CUDA kernels'."""
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes.functional as BF
    ops = {name: getattr(torch.ops.bitsandbytes, name).default for name in ("quantize_blockwise", "dequantize_4bit")}
    for name, op in ops.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd"):
            pytest.skip(f"this bitsandbytes has no torch kernel for {name} to compare with")
    torch_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    lib = torch.library.Library("bitsandbytes", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": on purpose, undone below
        for name, op in ops.items():
            lib.impl(name, lambda *args, op=op: op.redispatch(torch_kernel, *args), "CPU")
    BF.name2qmap.pop("dynamic", None)  # its cached 8-bit map, rebuilt fresh
    yield BF
    lib._destroy()  # the native kernel again


def weight(shape, dtype, seed=0, zero_block=False):
    torch.manual_seed(seed)
    w = torch.randn(shape) * 0.02
    if zero_block:  # an all-zero block, and an all-zero short last block: absmax 0
        w.view(-1)[:64] = 0
        w.view(-1)[-(w.numel() % 64 or 64):] = 0
    return w.to(dtype)


def assert_same_as_bnb(BF, w, double_quant):
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = nf4.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert q.packed.dtype == torch.uint8 and torch.equal(q.packed, packed.view(-1)), "packed bytes differ"
    if double_quant:
        assert torch.equal(q.absmax, state.absmax), "8-bit absmax codes differ"
        assert torch.equal(q.absmax_scale, state.state2.absmax), "second-level scales differ"
        assert torch.equal(q.absmax_offset, state.offset), "absmax offset (mean) differs"
    else:
        assert torch.equal(q.absmax, state.absmax), "float32 absmax differs"
    ours, theirs = nf4.dequantize_nf4(q), BF.dequantize_4bit(packed, state)
    assert ours.dtype == theirs.dtype == w.dtype and ours.shape == theirs.shape == w.shape
    assert torch.equal(ours, theirs), f"dequantized values differ by up to {(ours - theirs).abs().max().item():g}"


# ─── bit for bit against bitsandbytes ─────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_and_dequantize_match_bitsandbytes_bit_for_bit(bnb, dtype, double_quant, shape):
    assert_same_as_bnb(bnb, weight(shape, dtype), double_quant)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_zero_blocks_match_bitsandbytes_bit_for_bit(bnb, dtype, double_quant):
    assert_same_as_bnb(bnb, weight((33, 100), dtype, zero_block=True), double_quant)


def midpoints_weight():
    """The 15 float32 midpoints between NF4's levels, behind a 1.0 that makes the block's absmax 1."""
    levels = nf4.NF4_CODEBOOK
    return torch.cat([torch.ones(1), (levels[:-1] + levels[1:]) / 2]).view(1, -1)


def test_a_value_on_a_midpoint_goes_to_the_lower_level():
    q = nf4.quantize_nf4(midpoints_weight(), double_quant=False)
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)
    assert codes[1:16].tolist() == list(range(15))


def test_ties_match_bitsandbytes_bit_for_bit(bnb):
    assert_same_as_bnb(bnb, midpoints_weight(), double_quant=False)


def test_codebooks_match_bitsandbytes_bit_for_bit(bnb):
    assert torch.equal(nf4.NF4_CODEBOOK, bnb.get_4bit_type("nf4", device="cpu"))
    normal_map = bnb.create_normal_map()  # scipy's norm.ppf: 15 non-zero values among 256
    assert torch.equal(nf4.NF4_CODEBOOK[nf4.NF4_CODEBOOK != 0], normal_map[normal_map != 0])
    assert torch.equal(nf4.DYNAMIC_CODEBOOK, bnb.create_dynamic_map())


def test_native_cpu_kernel_is_not_always_nearest():
    """Why the comparisons use bitsandbytes' torch kernel for the 8-bit codes: its native CPU kernel is not exact."""
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes.functional as BF
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        pytest.skip("bitsandbytes' native CPU library is not loaded: its torch kernels run, which nf4.py matches")
    w = weight((1024, 1024), torch.float32)
    _, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = nf4.quantize_nf4(w)
    scaled = nf4._scale_blocks(nf4.quantize_nf4(w, double_quant=False).absmax - q.absmax_offset, 256)[1]
    distance = (scaled[:, None] - nf4.DYNAMIC_CODEBOOK).abs()  # (blocks, 256)
    best = distance.min(dim=1).values
    assert torch.equal(distance.gather(1, q.absmax.long()[:, None]).view(-1), best), "nf4.py: not the nearest"
    native = distance.gather(1, state.absmax.long()[:, None]).view(-1)
    assert 0 < (native > best).sum() < 0.01 * len(best), "the native kernel's misses were expected rare, not none"


def test_native_cpu_dequantize_treats_blocks_per_row():
    """Why the comparisons also use bitsandbytes' torch kernel for dequantize_4bit: its native CPU kernel takes
    the blocks row by row, so where a row is not a multiple of the block it dequantizes with the wrong scales (its
    torch and CUDA kernels take the flattened weight's blocks, as nf4.py and quantize_4bit do)."""
    pytest.importorskip("bitsandbytes", reason=NO_BNB)
    import bitsandbytes.functional as BF
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        pytest.skip("bitsandbytes' native CPU library is not loaded: its torch kernels run, which nf4.py matches")
    for shape, differs in (((128, 96), True), ((128, 64), False)):
        w = weight(shape, torch.float32)
        packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        ours = nf4.dequantize_nf4(nf4.quantize_nf4(w, double_quant=False))
        assert (not torch.equal(BF.dequantize_4bit(packed, state), ours)) == differs, shape


# ─── the codebooks and the round trip, torch alone ────────────────────────────────────────────────────────────

def test_nf4_codebook_has_16_levels_7_negative_an_exact_zero_8_positive_within_minus_one_one():
    levels = nf4.NF4_CODEBOOK
    assert levels.shape == (16,) and levels.dtype == torch.float32
    assert torch.equal(levels, levels.sort().values) and len(levels.unique()) == 16
    assert (levels < 0).sum() == 7 and levels[7] == 0 and (levels > 0).sum() == 8
    assert levels[0] == -1 and levels[-1] == 1


def test_nf4_levels_are_normal_quantiles_scaled_to_one():
    normal = torch.distributions.Normal(0.0, 1.0)
    p = torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1]
    quantiles = normal.icdf(p.float()).double()
    assert torch.allclose(nf4.NF4_CODEBOOK[8:].double(), (quantiles / quantiles[0]).flip(0), atol=1e-6)


def test_dynamic_codebook_has_256_distinct_levels_with_zero_and_one():
    levels = nf4.DYNAMIC_CODEBOOK
    assert levels.shape == (256,) and len(levels.unique()) == 256 and torch.equal(levels, levels.sort().values)
    assert levels[-1] == 1 and (levels == 0).sum() == 1 and levels.min() > -1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_each_value_goes_to_the_nearest_level(dtype):
    w = weight((40, 64), dtype)
    q = nf4.quantize_nf4(w, double_quant=False)
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1).long()
    scaled = w.float().view(-1, 64) / q.absmax[:, None]
    nearest = (scaled.view(-1, 1) - nf4.NF4_CODEBOOK).abs().argmin(dim=1)  # the lower level on a tie
    assert torch.equal(codes, nearest)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_round_trip_error_is_at_most_half_the_widest_gap_of_the_block_absmax(double_quant):
    w = weight((256, 256), torch.float32)
    back = nf4.dequantize_nf4(nf4.quantize_nf4(w, double_quant=double_quant))
    absmax = w.view(-1, 64).abs().amax(dim=1, keepdim=True)
    half_gap = nf4.NF4_CODEBOOK.diff().max() / 2  # 0.152, between -1 and -0.696
    slack = 0.01 if double_quant else 1e-6  # the 8-bit absmax is itself rounded (by < 1%)
    assert ((w - back).view(-1, 64).abs() <= absmax * (half_gap + slack)).all()
    assert (w - back).pow(2).mean() / w.pow(2).mean() < 0.01  # about 0.85% of the weights' energy


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 9), (3, 4, 64), (130,)], ids=str)
def test_dequantize_gives_back_shape_and_dtype(dtype, shape):
    w = torch.randn(shape).to(dtype)
    back = nf4.dequantize_nf4(nf4.quantize_nf4(w))
    assert back.shape == w.shape and back.dtype == dtype


@pytest.mark.parametrize("double_quant, bits", [(False, 4 + 32 / 64), (True, 4 + 8 / 64 + 32 / (64 * 256))])
def test_bits_per_parameter(double_quant, bits):
    q = nf4.quantize_nf4(torch.randn(1024, 1024), double_quant=double_quant)
    stored = 8 * sum(b.numel() * b.element_size() for b in q.buffers())
    assert stored / q.shape.numel() == pytest.approx(bits + (32 / 1024 ** 2 if double_quant else 0), abs=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        nf4.quantize_nf4(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.zeros(4), blocksize=100)
    with pytest.raises(ValueError, match="no elements"):
        nf4.quantize_nf4(torch.zeros(0, 4))


# ─── LinearNF4 ────────────────────────────────────────────────────────────────────────────────────────────────

def linear(in_f=96, out_f=40, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_nf4_computes_f_linear_of_the_dequantized_weight(dtype):
    base = linear(dtype=dtype)
    layer = nf4.LinearNF4.from_linear(base)
    x = torch.randn(5, 3, 96).to(dtype)
    w = nf4.dequantize_nf4(nf4.quantize_nf4(base.weight))
    assert torch.equal(layer.dequantized_weight(), w)
    assert torch.equal(layer(x), F.linear(x, w, base.bias))
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert torch.equal(layer.bias, base.bias) and layer.bias is not base.bias
    assert not any(p.requires_grad for p in layer.parameters())


def test_linear_nf4_gradients_are_those_of_f_linear_with_the_dequantized_weight():
    layer = nf4.LinearNF4.from_linear(linear())
    layer.bias.requires_grad_(True)  # a bias may train (lora.mark_only_lora_as_trainable(bias="all"))
    x = torch.randn(2, 5, 96, requires_grad=True)
    gy = torch.randn(2, 5, 40)
    layer(x).backward(gy)
    x_ref, b_ref = x.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.dequantized_weight(), b_ref).backward(gy)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.bias.grad, b_ref.grad)


def test_linear_nf4_keeps_no_dequantized_weight_for_backward():
    layer = nf4.LinearNF4.from_linear(linear(in_f=128, out_f=256))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(4, 128, requires_grad=True)).sum().backward()
    assert 128 * 256 not in saved


def test_linear_nf4_compute_dtype_is_what_the_weight_dequantizes_to():
    layer = nf4.LinearNF4.from_linear(linear(), compute_dtype=torch.bfloat16)
    assert layer.dequantized_weight().dtype == layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_to_dtype_changes_the_compute_dtype_and_keeps_the_stored_form():
    layer = nf4.LinearNF4.from_linear(linear(), double_quant=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.float16)
    assert layer.dequantized_weight().dtype == layer.bias.dtype == torch.float16
    after = layer.state_dict()
    for k in ("weight.packed", "weight.absmax", "weight.absmax_scale", "weight.absmax_offset"):
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double_quant"])
def test_state_dict_is_tensors_only_and_loads_back_exactly(double_quant):
    layer = nf4.LinearNF4.from_linear(linear(), double_quant=double_quant)
    keys = {"weight.packed", "weight.absmax", "bias"} | ({"weight.absmax_scale", "weight.absmax_offset"}
                                                         if double_quant else set())
    assert set(layer.state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = nf4.LinearNF4(96, 40, double_quant=double_quant)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), layer(x))


def test_loading_a_double_quant_state_dict_into_a_plain_layer_is_refused():
    state = nf4.LinearNF4.from_linear(linear(), double_quant=True).state_dict()
    with pytest.raises(RuntimeError, match="double_quant"):
        nf4.LinearNF4(96, 40, double_quant=False).load_state_dict(
            {k: v for k, v in state.items() if "absmax_" not in k})


def test_from_linear_refuses_a_subclass_with_its_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    with pytest.raises(TypeError, match="own forward"):
        nf4.LinearNF4.from_linear(Scaled(4, 4))


# ─── quantize_model ───────────────────────────────────────────────────────────────────────────────────────────

class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.classifier = nn.Linear(32, 2)

    def forward(self, x):
        return self.classifier(self.encoder(x))


class LanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 32)
        self.out = nn.Linear(32, 50)

    def get_output_embeddings(self):
        return self.out

    def forward(self, ids):
        return self.out(self.proj(self.embed(ids)))


def test_quantize_model_leaves_the_head_named_classifier():
    model = Classifier()
    x = torch.randn(8, 32)
    before = model(x)
    assert nf4.quantize_model(model) == ["encoder.0", "encoder.2"]
    assert isinstance(model.encoder[0], nf4.LinearNF4) and type(model.classifier) is nn.Linear
    assert (model(x) - before).abs().max() < 0.05 * before.abs().max()


def test_quantize_model_leaves_the_output_embeddings():
    model = LanguageModel()
    assert nf4.quantize_model(model) == ["proj"]
    assert type(model.out) is nn.Linear


def test_quantize_model_targets_by_name_end_and_glob():
    model = Classifier()
    assert nf4.quantize_model(model, targets=["2"]) == ["encoder.2"]
    assert nf4.quantize_model(model, targets="encoder.[0]") == ["encoder.0"]
    assert nf4.quantize_model(model, targets="classifier") == ["classifier"]  # asked for by name: done


def test_quantize_model_refuses_what_it_cannot_do_before_changing_anything():
    model = Classifier()
    with pytest.raises(TypeError, match="GELU"):
        nf4.quantize_model(model, targets="encoder.*")
    with pytest.raises(ValueError, match="matches no module"):
        nf4.quantize_model(model, targets="nothing")
    assert all(type(m) is nn.Linear for m in (model.encoder[0], model.encoder[2]))
    tied = LanguageModel()
    tied.out.weight = tied.embed.weight
    with pytest.raises(ValueError, match="tied"):
        nf4.quantize_model(tied, targets=["out"])


def test_quantize_model_leaves_multihead_attention_alone_with_a_warning():
    model = nn.Sequential(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), nn.Linear(32, 32),
                          nn.Linear(32, 2))  # the last: kept in full precision (see below)
    with pytest.warns(UserWarning, match="reads their weight directly"), pytest.warns(UserWarning, match="keeps '2'"):
        names = nf4.quantize_model(model)
    assert names == ["1"]
    with pytest.raises(TypeError, match="reads its weight"):
        nf4.quantize_model(model, targets="0.linear1")


def test_quantize_model_keeps_the_last_module_where_no_head_is_named_and_says_so():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with pytest.warns(UserWarning, match="keeps '4' in full precision: the model names no output head"):
        assert nf4.quantize_model(model) == ["0", "2"]
    assert type(model[4]) is nn.Linear
    ends_in_a_norm = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16))  # as BertModel without its pooler
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nf4.quantize_model(ends_in_a_norm) == ["0"]
        assert nf4.quantize_model(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3)), targets=["0", "1"]) == ["0", "1"]


def test_nf4_py_imports_torch_and_the_standard_library_only():
    """nf4.py is meant to be copied alone (and this file with it)."""
    for path in (Path(nf4.__file__), Path(__file__)):
        tree = ast.parse(path.read_text())
        roots = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
                 for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        assert roots <= {"torch", "nf4", "pytest", "bitsandbytes", "ast", "io", "warnings", "pathlib",
                         "fnmatch", "functools", "collections"}, (path.name, roots)


def test_linear_nf4_trains_under_bf16_autocast_as_its_dequantized_linear_does():
    """Autocast runs forward's product in bf16, so the gradient arriving in backward is bf16: the dequantized W
    must meet it in bf16 (a float32 W raised a dtype error). Input gradients as nn.Linear's under autocast."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = nf4.LinearNF4.from_linear(linear)
    plain = torch.nn.Linear(64, 32)
    plain.weight.data, plain.bias.data = layer.dequantized_weight(), layer.bias.detach().clone()
    x = torch.randn(8, 64, requires_grad=True)
    grads = []
    for module in (layer, plain):
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        assert y.dtype == torch.bfloat16
        y.float().pow(2).sum().backward()
        assert x.grad.dtype == torch.float32
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])

"""lora.py against its contract. Each test name states the property; CPU, seconds."""

import copy
import math
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora import LoRALinear

ROOT = Path(__file__).resolve().parents[1]


def mlp(seed=0, dtype=torch.float32):
    """The experiment's architecture: 784 -> 64 -> 64 -> 5, 54,725 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)).to(dtype)


def trained_layer(r=4, alpha=None, dtype=torch.float32, seed=0, **kw):
    """A LoRALinear whose B is no longer zero (and, for DoRA, whose magnitude moved), as after some training."""
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(32, 24).to(dtype), r=r, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        if layer.use_dora:
            layer.lora_magnitude.mul_(torch.empty_like(layer.lora_magnitude).uniform_(0.5, 1.5))
    return layer


def closed_form(layer, x):
    """base(x) + scaling · x Aᵀ Bᵀ, written independently of LoRALinear.forward, in float64."""
    W, b, A, B = (t.double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    x = x.double()
    return x @ W.T + b + layer.scaling * (x @ A.T @ B.T)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- construction -----------------------------------------------------------------------------------------

def test_wraps_the_base_tensors_without_copying_and_freezes_them():
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, r=2)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.shape == (2, 10) and layer.lora_B.shape == (6, 2)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert (layer.in_features, layer.out_features) == (10, 6)


@pytest.mark.parametrize("base, adapter", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                           (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_adapters_are_float32_on_a_half_precision_base_and_the_base_dtype_otherwise(base, adapter):
    layer = LoRALinear(nn.Linear(10, 6, dtype=base), r=2, use_dora=True)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.lora_magnitude.dtype == adapter
    assert layer(torch.randn(3, 10, dtype=base)).dtype == base
    assert LoRALinear(nn.Linear(10, 6, dtype=base), r=2, adapter_dtype=torch.bfloat16).lora_B.dtype == torch.bfloat16


def test_identity_at_init_is_exact():
    base = nn.Linear(20, 7)
    x = torch.randn(5, 3, 20)
    expected = base(x)
    layer = LoRALinear(base, r=4, alpha=16, dropout=0.3)
    layer.train()
    assert torch.equal(layer.lora_B, torch.zeros(7, 4))
    assert torch.equal(layer(x), expected)


def test_base_without_bias():
    base = nn.Linear(12, 5, bias=False)
    layer = LoRALinear(base, r=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 12)
    expected = x @ layer.weight.T + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert set(layer.state_dict()) == {"weight", "lora_A", "lora_B"}


def test_forward_equals_closed_form():
    layer = trained_layer(r=4, alpha=8)
    x = torch.randn(3, 5, 32)  # any leading dims
    out = layer(x)
    assert out.shape == (3, 5, 24)
    assert rel_err(out, closed_form(layer, x)) < 1e-6


def test_scaling_is_alpha_over_r_and_alpha_defaults_to_r():
    assert LoRALinear(nn.Linear(8, 8), r=4).scaling == 1.0
    assert LoRALinear(nn.Linear(8, 8), r=4, alpha=16).scaling == 4.0


def test_rslora_scales_by_alpha_over_sqrt_r():
    layer = LoRALinear(nn.Linear(64, 64), r=16, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))
    assert LoRALinear(nn.Linear(64, 64), r=16, use_rslora=True).scaling == pytest.approx(4.0)  # alpha = r


def test_kaiming_init_is_uniform_with_bound_one_over_sqrt_fan_in():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(1024, 1024), r=64)
    bound = 1 / math.sqrt(1024)  # depends on in_features, not on r
    A = layer.lora_A
    assert A.abs().max() <= bound
    assert A.abs().max() > 0.99 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)  # std of U(-b, b)


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(1024, 1024), r=8, init="gaussian")
    assert layer.lora_A.mean().item() == pytest.approx(0, abs=5 / 8 / math.sqrt(8 * 1024))  # 5 standard errors
    assert layer.lora_A.std().item() == pytest.approx(1 / 8, rel=0.01)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


# --- training --------------------------------------------------------------------------------------------

def test_only_lora_gets_gradients_and_a_step_leaves_the_base_bit_identical():
    model = mlp()
    lora.add_lora(model, r=4)
    lora.mark_only_lora_as_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(16, 784), torch.randint(0, 5, (16,))
    for _ in range(2):  # after one step B != 0, so the second step also moves A
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            is_lora = name.endswith(("lora_A", "lora_B"))
            assert (p.grad is not None) == is_lora, name
        opt.step()
    for k, v in model.state_dict().items():
        if k.endswith(("lora_A", "lora_B")):
            assert not torch.equal(v, before[k]), f"{k} did not train"
        else:
            assert torch.equal(v, before[k]), f"{k} changed"


def test_trainable_count_is_r_times_in_plus_out_per_layer():
    for r in (1, 2, 8, 64):
        model = mlp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # r = 64 > 5 on the head; tested below
            lora.add_lora(model, r=r)
        lora.mark_only_lora_as_trainable(model)
        assert lora.count_parameters(model) == (r * ((784 + 64) + (64 + 64) + (64 + 5)), 54_725 + 1_045 * r)


def test_count_parameters_counts_shared_parameters_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, shared)
    assert lora.count_parameters(model) == (20, 20)


def test_dropout_acts_only_in_training_mode():
    layer = trained_layer(dropout=0.5)
    x = torch.randn(64, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert rel_err(layer(x), closed_form(layer, x)) < 1e-6
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    assert not torch.equal(a, layer(x))


def test_no_dropout_copy_of_x_when_p_is_zero(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(1) or a[0])
    layer = trained_layer(dropout=0.0).train()
    layer(torch.randn(2, 32))
    assert calls == []


def test_gradcheck_of_the_lora_branch_in_float64():
    layer = trained_layer(r=3, alpha=6).double()
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True)

    def f(x, A, B):
        return torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))

    A = layer.lora_A.detach().clone().requires_grad_()
    B = layer.lora_B.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, A, B))


# --- merge -----------------------------------------------------------------------------------------------

def test_merged_output_matches_unmerged_in_float32():
    layer = trained_layer(r=8, alpha=16).eval()
    x = torch.randn(16, 32)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), unmerged) < 1e-5


def test_merged_output_matches_unmerged_in_bfloat16():
    layer = trained_layer(r=8, alpha=16, dtype=torch.bfloat16).eval()
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    unmerged = layer(x)
    exact = closed_form(layer, x)
    assert rel_err(unmerged, exact) < 2e-2  # a few bf16 roundings (eps = 2^-8)
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    assert rel_err(layer(x), unmerged) < 2e-2
    assert rel_err(layer(x), exact) < 2e-2


def test_delta_weight_is_scaling_times_B_A():
    layer = trained_layer(r=4, alpha=2)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * layer.lora_B @ layer.lora_A)
    assert layer.delta_weight().shape == (24, 32)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_twice_is_merge_once_and_unmerge_restores_the_weight_up_to_rounding(use_dora):
    layer = trained_layer(use_dora=use_dora)
    w0 = layer.weight.detach().clone()
    layer.merge()
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once)
    assert not torch.equal(once, w0)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)  # no copy kept: the bound is tested below
    after = layer.weight.detach().clone()
    layer.unmerge()  # no-op
    assert torch.equal(layer.weight, after)


def test_merge_refuses_nan_or_inf_and_leaves_the_weight_untouched():
    for bad in (float("nan"), float("inf")):
        layer = trained_layer()
        w0 = layer.weight.detach().clone()
        with torch.no_grad():
            layer.lora_B[0, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            layer.merge()
        assert torch.equal(layer.weight, w0) and not layer.merged


def test_merge_overflowing_float16_is_refused():
    layer = trained_layer(dtype=torch.float16)
    with torch.no_grad():
        layer.lora_B.fill_(300.0)
        layer.lora_A.fill_(300.0)  # B A = 4 * 9e4 > float16 max 65504
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or Inf into the torch.float16 weight"):
        layer.merge()
    assert torch.equal(layer.weight, w0)


def test_merge_lora_leaves_plain_linears_with_the_same_outputs():
    model = mlp().eval()
    lora.add_lora(model, r=4, alpha=8)
    for _, layer in lora.lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    x = torch.randn(8, 784)
    expected = model(x)
    assert lora.merge_lora(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert set(model.state_dict()) == set(mlp().state_dict())
    assert rel_err(model(x), expected) < 1e-5


def test_merge_lora_with_one_diverged_layer_changes_nothing():
    model = mlp()
    lora.add_lora(model, r=2)
    with torch.no_grad():
        model[4].lora_B.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'4'"):
        lora.merge_lora(model)
    assert all(isinstance(model[i], LoRALinear) for i in (0, 2, 4))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("use_dora", [False, True])
def test_disable_lora_gives_exactly_the_base_output_unmerged_and_up_to_rounding_merged(use_dora):
    base = mlp().eval()
    x = torch.randn(8, 784)
    expected = base(x)
    model = copy.deepcopy(base)
    lora.add_lora(model, r=4, use_dora=use_dora)
    for _, layer in lora.lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    adapted = model(x)
    assert not torch.equal(adapted, expected)
    with lora.disable_lora(model):
        assert torch.equal(model(x), expected)  # the enabled switch: exact
    assert all(layer.enabled and not layer.merged for _, layer in lora.lora_layers(model))
    assert torch.equal(model(x), adapted)
    model[0].merge()  # a mix: one layer merged, two not
    with lora.disable_lora(model):
        assert not model[0].merged
        assert 0 < rel_err(model(x), expected) < 1e-6  # unmerged in place: W comes back up to rounding
    assert model[0].merged and model[2].enabled
    assert rel_err(model(x), adapted) < 1e-5


def test_disable_lora_restores_state_after_an_exception():
    model = mlp()
    lora.add_lora(model, r=2)
    model[2].merge()
    with pytest.raises(RuntimeError):
        with lora.disable_lora(model):
            raise RuntimeError("boom")
    assert model[2].merged and all(layer.enabled for _, layer in lora.lora_layers(model))


# --- DoRA ------------------------------------------------------------------------------------------------

def dora_reference(x, W, b, A, B, m, scaling, norm_constant=True):
    """m ⊙ (W + s B A) x / ‖W + s B A‖ + b, from the paper's formula (not from lora.py); the norm held constant
    in backward (paper, section 4.3) unless norm_constant=False."""
    V = W + scaling * B @ A  # (out, in)
    norm = V.norm(dim=1, keepdim=True)  # (out, 1), over the input dimension
    return x @ (m[:, None] * V / (norm.detach() if norm_constant else norm)).T + b


def float64_tensors(layer):
    """W, b (0 if none), A, B, m of a DoRA layer, in float64."""
    tensors = (layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude)
    return [0.0 if t is None else t.detach().double() for t in tensors]


def test_dora_magnitude_starts_at_the_row_norms_of_W_so_the_output_starts_at_the_base_model():
    base = nn.Linear(20, 7)
    x = torch.randn(5, 3, 20)
    expected = base(x)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True).train()
    assert layer.lora_magnitude.shape == (7,) and layer.lora_magnitude.requires_grad
    torch.testing.assert_close(layer.lora_magnitude, base.weight.detach().norm(dim=1), rtol=1e-6, atol=0)
    assert torch.equal(layer.lora_B, torch.zeros(7, 4))
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-7)  # m / ‖W‖ = 1 up to one rounding


@pytest.mark.parametrize("bias, use_rslora", [(True, False), (False, False), (True, True)])
def test_dora_forward_equals_the_float64_closed_form(bias, use_rslora):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24, bias=bias), r=4, alpha=8, use_rslora=use_rslora, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        layer.lora_magnitude.mul_(torch.empty(24).uniform_(0.5, 1.5))
    x = torch.randn(3, 5, 32)  # any leading dims
    W, b, A, B, m = float64_tensors(layer)
    out = layer(x)
    assert out.shape == (3, 5, 24)
    assert rel_err(out, dora_reference(x.double(), W, b, A, B, m, layer.scaling)) < 1e-6


def test_dora_weight_norm_equals_the_direct_row_norm_in_float64():
    layer = trained_layer(r=4, alpha=8, use_dora=True)
    W, _, A, B, _ = float64_tensors(layer)
    direct = (W + layer.scaling * B @ A).norm(dim=1)  # builds the (out, in) matrix, as the expansion avoids
    assert layer.weight_norm().dtype == torch.float32
    assert rel_err(layer.weight_norm(), direct) < 1e-6


def test_dora_gradients_equal_the_float64_closed_form_with_the_norm_held_constant():
    layer = trained_layer(r=3, alpha=6, use_dora=True).double()
    x = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(6, 24, dtype=torch.float64)
    layer(x).backward(gy)
    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude.grad, x.grad]
    W, b, *adapter = float64_tensors(layer)
    for norm_constant in (True, False):
        leaves = [t.clone().requires_grad_() for t in adapter + [x.detach()]]
        A, B, m, xr = leaves
        dora_reference(xr, W, b, A, B, m, layer.scaling, norm_constant).backward(gy)
        if norm_constant:
            for got, want in zip(ours, [t.grad for t in leaves]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        else:  # the test can tell: differentiating the norm changes the gradient of B
            assert not torch.allclose(ours[1], B.grad, rtol=1e-3, atol=0)


def test_dora_dropout_drops_only_the_adapter_input_as_the_paper_code_and_peft(monkeypatch):
    layer = trained_layer(r=4, alpha=8, dropout=0.5, use_dora=True).train()
    x = torch.randn(16, 32)
    mask = (torch.rand(16, 32) > 0.5).float() * 2  # a fixed dropout mask, so the reference can use it
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda t, p, training: t * mask if training else t)
    W, b, A, B, m = float64_tensors(layer)
    x64, x_drop = x.double(), (x * mask).double()
    n = (W + layer.scaling * B @ A).norm(dim=1)
    # W x + b + (m/n - 1) ⊙ W x_drop + (m/n) ⊙ s B A x_drop
    expected = x64 @ W.T + b + (m / n - 1) * (x_drop @ W.T) + (m / n) * layer.scaling * (x_drop @ A.T @ B.T)
    assert rel_err(layer(x), expected) < 1e-6
    layer.eval()
    assert rel_err(layer(x), dora_reference(x64, W, b, A, B, m, layer.scaling)) < 1e-6


def test_dora_merge_writes_the_closed_form_weight_and_keeps_the_output():
    layer = trained_layer(r=4, alpha=8, use_dora=True).eval()
    W, _, A, B, m = float64_tensors(layer)
    V = W + layer.scaling * B @ A
    x = torch.randn(16, 32)
    unmerged = layer(x)
    assert rel_err(layer.merged_weight(), m[:, None] * V / V.norm(dim=1, keepdim=True)) < 1e-6
    layer.merge()
    assert rel_err(layer.weight.norm(dim=1), m) < 1e-6  # each row now has length m
    assert rel_err(layer(x), unmerged) < 1e-5


def test_dora_adds_out_features_trainable_parameters_per_layer():
    model = mlp()
    lora.add_lora(model, r=2, use_dora=True)
    lora.mark_only_lora_as_trainable(model)
    assert lora.count_parameters(model) == (2 * 1_045 + (64 + 64 + 5), 54_725 + 2 * 1_045 + 133)
    assert list(model[4].state_dict()) == ["weight", "bias", "lora_A", "lora_B", "lora_magnitude"]


def test_dora_refuses_a_weight_with_an_all_zero_row():
    def zero_row():
        model = Tiny()
        with torch.no_grad():
            model.layers[1].key.weight[3] = 0
        return model
    unchanged(zero_row, lambda m: lora.add_lora(m, r=2, use_dora=True), ValueError,
              r"'layers.1.key' has all-zero rows \[3\].*divides each row by its norm: wrap this layer with use_dora=False, or leave it out")
    lora.add_lora(zero_row(), r=2)  # plain LoRA does not divide by the norm


# --- merging in place -------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_changes_W_in_place_and_keeps_no_copy_of_it(use_dora):
    layer = trained_layer(use_dora=use_dora)
    pointer = layer.weight.data_ptr()
    layer.merge()
    assert layer.weight.data_ptr() == pointer
    assert not hasattr(layer, "weight_before_merge")
    # DoRA keeps the (out,) norm it divided by, to undo it; nothing of W's size
    assert [tuple(b.shape) for b in layer.buffers()] == ([(24,)] if use_dora else [])


UNIT_ROUNDOFF = {torch.float32: 2**-24, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
def test_merge_rounds_once_and_unmerge_restores_W_within_the_documented_bound(dtype, use_dora):
    u, u32, r = UNIT_ROUNDOFF[dtype], 2**-24, 8
    k = 3 if use_dora else 1  # as merge's docstring states
    tiny = 2**-24 if dtype == torch.float16 else 0  # float16's subnormal spacing near zero
    for seed in range(3):
        torch.manual_seed(seed)
        layer = LoRALinear(nn.Linear(64, 48).to(dtype), r=r, alpha=2 * r, use_dora=use_dora)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.05)
            if use_dora:
                layer.lora_magnitude.mul_(torch.empty(48).uniform_(0.8, 1.2).to(dtype))
        W, _, A, B = (t.detach().double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
        V = W + layer.scaling * B @ A  # W + ΔW, exact
        factor = layer.lora_magnitude.double()[:, None] / V.norm(dim=1, keepdim=True) if use_dora else 1
        layer.merge()
        # merge: one rounding of the exact weight to `dtype`, plus float32's in forming s B A (r + 1) and the rest
        merge_bound = (u + k * u32) * (factor * V).abs() + (r + 1) * u32 * layer.scaling * (B.abs() @ A.abs()) \
            * factor + tiny
        assert ((layer.weight.double() - factor * V).abs() <= merge_bound).all()
        layer.unmerge()
        assert ((layer.weight.double() - W).abs() <= u * W.abs() + (u + k * u32) * V.abs() + 2 * tiny).all()


def test_a_merged_layer_refuses_to_train_and_says_how():
    layer = trained_layer().train()
    x = torch.randn(3, 32)
    layer.merge()
    with pytest.raises(RuntimeError, match=r"merged.*no gradient.*unmerge\(\)"):
        layer(x)
    with torch.no_grad():
        layer(x)  # inference is fine, in either mode
    layer.eval()(x)
    layer.train().requires_grad_(False)
    layer(x)  # nothing of the adapter trains: nothing is lost
    layer.unmerge()
    layer.lora_B.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_merged_state_dict_loads_into_a_fresh_wrapped_model_without_applying_the_update_twice(tmp_path, use_dora):
    model = mlp().eval()
    lora.add_lora(model, r=4, use_dora=use_dora)
    for _, layer in lora.lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    x = torch.randn(8, 784)
    expected = model(x)
    base_W = model[0].weight.detach().clone()
    model[0].merge()
    model[4].merge()
    sd = model.state_dict()
    assert sd["0.lora_merged"] and "2.lora_merged" not in sd
    assert ("0.lora_merged_norm" in sd) == use_dora
    torch.save(sd, tmp_path / "merged.pt")

    fresh = mlp(seed=1).eval()
    lora.add_lora(fresh, r=4, use_dora=use_dora)
    assert fresh.load_state_dict(torch.load(tmp_path / "merged.pt")) is not None  # strict: every key accounted for
    assert [fresh[i].merged for i in (0, 2, 4)] == [True, False, True]
    assert rel_err(fresh(x), expected) < 1e-6
    fresh[0].unmerge()
    torch.testing.assert_close(fresh[0].weight, base_W, rtol=0, atol=1e-6)
    assert rel_err(fresh(x), expected) < 1e-5

    fresh[0].merge()
    unmerged_sd = mlp().state_dict()  # a plain base checkpoint: loading it leaves the layers unmerged
    fresh.load_state_dict(unmerged_sd, strict=False)
    assert not any(layer.merged for _, layer in lora.lora_layers(fresh))


def test_loading_only_the_adapter_into_a_merged_layer_is_refused():
    model = mlp()
    lora.add_lora(model, r=4)
    model[0].merge()
    adapter = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    with pytest.raises(RuntimeError, match="layer '0' is merged.*unmerge"):
        model.load_state_dict(adapter, strict=False)


# --- state dicts -----------------------------------------------------------------------------------------

def test_state_dict_keeps_base_key_names_and_adds_lora_keys():
    model = mlp()
    keys = list(model.state_dict())
    lora.add_lora(model, r=2, targets=["0", "4"])
    assert list(model.state_dict()) == ["0.weight", "0.bias", "0.lora_A", "0.lora_B", "2.weight", "2.bias",
                                        "4.weight", "4.bias", "4.lora_A", "4.lora_B"]
    assert set(keys) <= set(model.state_dict())


def test_a_base_checkpoint_saved_before_wrapping_loads_after(tmp_path):
    pretrained = mlp(seed=1)
    torch.save(pretrained.state_dict(), tmp_path / "base.pt")
    model = mlp(seed=2)
    lora.add_lora(model, r=4)
    result = model.load_state_dict(torch.load(tmp_path / "base.pt"), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(k for k in model.state_dict() if "lora_" in k)
    x = torch.randn(4, 784)
    assert torch.equal(model.eval()(x), pretrained.eval()(x))  # B = 0: the pretrained model exactly


def test_adapter_round_trip_into_a_freshly_wrapped_model_reproduces_outputs(tmp_path):
    model = mlp()
    lora.add_lora(model, r=4)
    for _, layer in lora.lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    sd = lora.lora_state_dict(model)
    assert set(sd) == {f"{i}.{n}" for i in (0, 2, 4) for n in ("lora_A", "lora_B", *lora.SETTINGS)}
    torch.save(sd, tmp_path / "adapter.pt")
    fresh = mlp()  # same base weights (same seed), new random adapter
    lora.add_lora(fresh, r=4)
    lora.load_lora_state_dict(fresh, torch.load(tmp_path / "adapter.pt"))
    x = torch.randn(4, 784)
    assert torch.equal(fresh(x), model(x))


def test_load_lora_state_dict_refuses_bad_input_and_changes_nothing():
    model = mlp()
    lora.add_lora(model, r=4)
    good = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    missing = dict(good)
    del missing["2.lora_B"]
    with pytest.raises(KeyError, match=r"'2' lacks \['lora_B'\]"):
        lora.load_lora_state_dict(model, missing)
    with pytest.raises(KeyError, match=r"the model lacks \['9'\]"):
        lora.load_lora_state_dict(model, {**good, "9.lora_A": torch.zeros(4, 4), "9.lora_B": torch.zeros(4, 4),
                                          "9.lora_alpha": torch.tensor(4.0), "9.lora_use_rslora": torch.tensor(False)})
    wrong = {**good, "0.lora_A": torch.zeros(8, 784)}
    with pytest.raises(ValueError, match=r"'0': the adapter's lora_A has shape \(8, 784\), but .* needs \(4, 784\) "
                                         r"\(the adapter has r=8: add_lora with that r"):
        lora.load_lora_state_dict(model, wrong)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model[0].merge()
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="merged"):
        lora.load_lora_state_dict(model, good)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bias, biases", [
    ("none", set()),
    ("lora_only", {"layers.0.query.bias", "layers.1.query.bias"}),
    ("all", {f"layers.{i}.{n}.bias" for i in (0, 1) for n in ("query", "key", "value", "norm")} | {"head.bias"}),
])
def test_lora_state_dict_keeps_the_biases_mark_only_lora_as_trainable_trains(bias, biases):
    model = Tiny()
    lora.add_lora(model, r=2, targets="query", alpha=4)
    lora.mark_only_lora_as_trainable(model, bias=bias)
    sd = lora.lora_state_dict(model)
    adapter = {f"layers.{i}.query.{n}" for i in (0, 1) for n in ("lora_A", "lora_B", *lora.SETTINGS)}
    assert set(sd) == adapter | biases
    assert sd["layers.1.query.lora_alpha"].item() == 4.0 and not sd["layers.1.query.lora_use_rslora"]


def test_lora_state_dict_keeps_a_module_trained_in_full_with_its_buffers():
    model = Tiny()
    model.layers[0].bn = nn.BatchNorm1d(8)
    lora.add_lora(model, r=2, targets="query")
    lora.mark_only_lora_as_trainable(model, bias="all", modules_to_save=["head", "layers.0.bn"])
    assert model.head.weight.requires_grad and model.layers[0].bn.weight.requires_grad
    sd = lora.lora_state_dict(model)
    assert {"head.weight", "head.bias", "layers.0.norm.bias", "layers.0.bn.running_mean"} <= set(sd)
    assert "layers.0.norm.weight" not in sd and "layers.0.query.weight" not in sd


def test_an_adapter_with_trained_biases_round_trips_into_a_fresh_model():
    torch.manual_seed(0)
    model = Tiny()
    base = copy.deepcopy(model)
    lora.add_lora(model, r=2, targets="query", use_dora=True)
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    sd = lora.lora_state_dict(model)
    lora.add_lora(base, r=2, targets="query", use_dora=True)
    lora.load_lora_state_dict(base, sd)
    x = torch.randn(3, 8)
    block = lambda m: m.layers[0].query(x) + m.layers[1].query(x)
    assert torch.equal(block(base), block(model))


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=16), r"'0': the adapter was saved with \{'alpha': 8.0\}, this layer has \{'alpha': 16.0\}"),
    (dict(alpha=8, use_rslora=True), r"saved with \{'use_rslora': False\}, this layer has \{'use_rslora': True\}"),
    (dict(alpha=8, dropout=0.1), r"saved with \{'dropout': 0.0\}"),
    (dict(alpha=8, adapter_dtype=torch.float64), r"saved with \{'adapter_dtype': torch.float32\}"),
])
def test_load_lora_state_dict_refuses_another_alpha_or_rslora_and_changes_nothing(kwargs, match):
    trained = mlp()
    lora.add_lora(trained, r=4, alpha=8)
    sd = lora.lora_state_dict(trained)

    def wrapped():
        model = mlp()
        lora.add_lora(model, r=4, **kwargs)
        return model
    unchanged(wrapped, lambda m: lora.load_lora_state_dict(m, sd), ValueError, match)


def test_load_lora_state_dict_names_the_magnitudes_of_a_dora_adapter_in_a_lora_model():
    dora = mlp()
    lora.add_lora(dora, r=2, use_dora=True)
    model = mlp()
    lora.add_lora(model, r=2)
    with pytest.raises(ValueError, match=r"'0': the adapter was saved with \{'use_dora': True\}"):
        lora.load_lora_state_dict(model, lora.lora_state_dict(dora))


# --- add_lora and mark_only_lora_as_trainable --------------------------------------------------------------

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 2)


def test_add_lora_targets_by_exact_name_last_component_and_glob():
    assert lora.add_lora(Tiny(), r=2) == ["layers.0.query", "layers.0.key", "layers.0.value",
                                          "layers.1.query", "layers.1.key", "layers.1.value", "head"]
    assert lora.add_lora(Tiny(), r=2, targets=["value", "query"]) == [
        "layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]  # module order
    assert lora.add_lora(Tiny(), r=2, targets="layers.1.key") == ["layers.1.key"]
    assert lora.add_lora(Tiny(), r=2, targets="layers.*.k*") == ["layers.0.key", "layers.1.key"]
    model = Tiny()
    lora.add_lora(model, r=2, targets=["query", "layers.0.query"])  # overlapping targets wrap once
    assert isinstance(model.layers[0].query, LoRALinear) and isinstance(model.layers[0].query.weight, nn.Parameter)


def unchanged(model_fn, call, exc, match):
    """call(model) raises exc and leaves the model's modules and state exactly as they were."""
    model = model_fn()
    modules = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        call(model)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive int, got 0"),
    (dict(r=-1), "got -1"),
    (dict(r=1.5), "got 1.5"),
    (dict(r=True), "got True"),
    (dict(r="8"), "got '8'"),
    (dict(r=2, alpha=0), "alpha must be a positive finite number"),
    (dict(r=2, alpha=-1.0), "got -1.0"),
    (dict(r=2, alpha=float("nan")), "got nan"),
    (dict(r=2, alpha=float("inf")), "got inf"),
    (dict(r=2, dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(r=2, dropout=-0.1), "got -0.1"),
    (dict(r=2, init="xavier"), r"init must be one of \('kaiming', 'gaussian'\), got 'xavier'"),
    (dict(r=2, use_rslora="yes"), "use_rslora"),
    (dict(r=2, use_dora=1), "use_dora must be True or False, got 1"),
])
def test_bad_hyperparameters_raise_value_error_before_touching_anything(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **kwargs)
    unchanged(Tiny, lambda m: lora.add_lora(m, **kwargs), ValueError, match)


def test_base_that_is_not_linear_raises_type_error():
    with pytest.raises(TypeError, match="base is a LayerNorm; lora.py wraps nn.Linear, transformers' Conv1D, nn.Embed"):
        LoRALinear(nn.LayerNorm(4), r=2)
    with pytest.raises(TypeError, match="base is a Conv1d: wrap it with LoRAConv"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2)


def test_a_target_that_matches_nothing_lists_the_linear_layers():
    unchanged(Tiny, lambda m: lora.add_lora(m, r=2, targets=["query", "qkv"]), ValueError,
              r"'qkv' matches no module.*'layers.0.query'.*'head'")


def test_a_target_that_is_not_linear_raises_type_error():
    unchanged(Tiny, lambda m: lora.add_lora(m, r=2, targets=["query", "norm"]), TypeError,
              r"'layers.0.norm' \(matched by targets\) is a LayerNorm; lora.py wraps nn.Linear, transformers' Conv1D")


def test_wrapping_twice_is_refused_so_rerunning_a_cell_cannot_stack_adapters():
    def wrapped():
        model = Tiny()
        lora.add_lora(model, r=2, targets="query")
        return model
    for targets in (None, "query", ["layers.0.query"]):
        unchanged(wrapped, lambda m: lora.add_lora(m, r=2, targets=targets), ValueError, "already carries LoRA")
    with pytest.raises(ValueError, match="already carries LoRA"):
        LoRALinear(wrapped().layers[0].query, r=2)


def test_multihead_attention_out_proj_alone_is_refused_naming_the_attention_and_targets_none_takes_the_attention():
    unchanged(lambda: nn.TransformerEncoderLayer(8, 2, 16), lambda m: lora.add_lora(m, r=2, targets="out_proj"),
              TypeError, r"'self_attn.out_proj' .* is the out_proj of an nn.MultiheadAttention.*target the "
              r"attention itself \('self_attn'\)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lora.add_lora(nn.TransformerEncoderLayer(8, 2, 16), r=2) == ["self_attn", "linear1", "linear2"]


def test_r_above_min_dimension_is_allowed_with_one_warning():
    model = mlp()
    with pytest.warns(UserWarning) as record:
        lora.add_lora(model, r=64)
    assert len(record) == 1  # only the 64 -> 5 head
    assert "rank at most 5" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.add_lora(mlp(), r=5)  # r = min(in, out) is fine


@pytest.mark.parametrize("bias, trainable", [
    ("none", {"layers.0.query.lora_A", "layers.0.query.lora_B"}),
    ("lora_only", {"layers.0.query.lora_A", "layers.0.query.lora_B", "layers.0.query.bias"}),
    ("all", {"layers.0.query.lora_A", "layers.0.query.lora_B"} |
     {f"layers.{i}.{n}.bias" for i in (0, 1) for n in ("query", "key", "value", "norm")} | {"head.bias"}),
])
def test_mark_only_lora_as_trainable_bias_modes(bias, trainable):
    model = Tiny()
    lora.add_lora(model, r=2, targets="layers.0.query")
    lora.mark_only_lora_as_trainable(model, bias=bias)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_mark_only_lora_as_trainable_refuses_an_unknown_bias_mode():
    model = Tiny()
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"):
        lora.mark_only_lora_as_trainable(model, bias="some")
    assert [p.requires_grad for p in model.parameters()] == flags


# --- works with the rest of PyTorch ----------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_deepcopy_and_pickle_round_trip(use_dora):
    layer = trained_layer(use_dora=use_dora)
    x = torch.randn(3, 32)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(clone(x), layer(x))
        assert clone.weight is not layer.weight
    layer.merge()
    clone = copy.deepcopy(layer)
    clone.unmerge()
    layer.unmerge()
    assert torch.equal(clone.weight, layer.weight)


@pytest.mark.parametrize("use_dora", [False, True])
def test_functional_call_swaps_the_adapter(use_dora):
    layer = trained_layer(use_dora=use_dora)
    x = torch.randn(3, 32)
    swap = {"lora_B": torch.zeros_like(layer.lora_B)}
    if use_dora:
        swap["lora_magnitude"] = layer.weight.detach().norm(dim=1)  # with B = 0 as well: the base model again
    out = torch.func.functional_call(layer, swap, (x,))
    tol = 1e-6 if use_dora else 0  # LoRA adds an exact zero; DoRA multiplies by m / ‖W‖ = 1 up to rounding
    torch.testing.assert_close(out, nn.functional.linear(x, layer.weight, layer.bias), rtol=tol, atol=tol)


@pytest.mark.parametrize("use_dora", [False, True])
def test_vmap_over_stacked_adapters_matches_a_loop(use_dora):
    warnings.simplefilter("error")  # e.g. vmap's "performance drop" warning for an op without a batching rule
    layer = trained_layer(use_dora=use_dora)
    A = torch.randn(3, *layer.lora_A.shape)
    B = torch.randn(3, *layer.lora_B.shape)
    x = torch.randn(3, 5, 32)
    f = lambda A, B, x: torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))
    stacked = torch.vmap(f)(A, B, x)
    for i in range(3):
        torch.testing.assert_close(stacked[i], f(A[i], B[i], x[i]))


@pytest.mark.parametrize("use_dora", [False, True])
def test_torch_compile_full_graph_matches_eager(use_dora):
    torch._dynamo.reset()
    layer = trained_layer(use_dora=use_dora)
    x = torch.randn(4, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.weight.grad is None


def test_lora_py_alone_in_an_empty_folder_imports_and_trains(tmp_path):
    shutil.copy(ROOT / "lora.py", tmp_path / "lora.py")
    script = textwrap.dedent("""
        import sys, torch, torch.nn as nn, lora
        assert lora.__file__.startswith(sys.argv[1]), lora.__file__
        model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
        lora.add_lora(model, r=2)
        lora.mark_only_lora_as_trainable(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        loss = model(torch.randn(4, 10)).sum()
        loss.backward()
        opt.step()
        print("trained", lora.count_parameters(model))
    """)
    (tmp_path / "use_lora.py").write_text(script)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "use_lora.py", str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "trained (64, 196)" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_forward_backward_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16)
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.1)
    assert layer.lora_A.device.type == "cuda" and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    layer(x).float().pow(2).mean().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0 and layer.weight.grad is None
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    layer.eval()
    unmerged = layer(x)
    assert rel_err(unmerged, closed_form(layer, x)) < 2e-2
    layer.merge()
    merged = layer(x)
    print(f"\ncuda bf16 on {torch.cuda.get_device_name()}: merged vs unmerged rel err {rel_err(merged, unmerged):.2e}")
    assert rel_err(merged, unmerged) < 2e-2
    layer.unmerge()
    assert torch.equal(lora.LoRALinear.merged_weight(layer), (layer.weight.float() + layer.scaling * (
        layer.lora_B @ layer.lora_A)).bfloat16())  # formed in float32, rounded once
    compiled = torch.compile(LoRALinear(nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16), r=8))
    assert compiled(x).shape == (64, 128)


# --- the layers people bring: Conv1D, nn.Embedding, tied weights, subclasses, the transformer fast path ----------

class Conv1D(nn.Module):
    """transformers' Conv1D as GPT-2 uses it (W stored (in, out)), written here so lora.py's tests need no
    transformers: lora.py recognises it by class name, nf and nx."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_conv1d_forward_merge_and_disable_follow_the_closed_form_with_w_stored_in_by_out():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 8))
    base = copy.deepcopy(model)
    x = torch.randn(2, 3, 8)
    assert lora.add_lora(model, r=2, alpha=4) == ["0"]
    assert torch.equal(model(x), base(x))  # B = 0: the base output, bit for bit
    layer = model[0]
    assert layer.lora_A.shape == (2, 8) and layer.lora_B.shape == (6, 2)
    with torch.no_grad():
        layer.lora_B.normal_()
    W, b, A, B = (t.double() for t in (layer.weight, layer.bias, layer.lora_A, layer.lora_B))
    expected = x.double() @ W + b + 2.0 * x.double() @ A.T @ B.T
    assert rel_err(model(x), expected) < 1e-6
    with lora.disable_lora(model):
        assert torch.equal(model(x), base(x))
    lora.merge_lora(model)
    assert type(model[0]) is Conv1D and model[0].nf == 6 and model[0].weight is layer.weight
    torch.testing.assert_close(model[0].weight.double(), W + 2.0 * (B @ A).T)
    assert rel_err(model(x), expected) < 1e-6


def test_embedding_adds_the_looked_up_row_of_scaled_BA_transposed_and_keeps_the_pad_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, padding_idx=0))
    base = copy.deepcopy(model)
    ids = torch.tensor([[0, 3, 9], [1, 0, 3]])
    assert lora.add_lora(model, r=2, alpha=4, targets="0") == ["0"]
    layer = model[0]
    assert isinstance(layer, lora.LoRAEmbedding) and layer.lora_A.shape == (2, 10) and layer.lora_B.shape == (6, 2)
    assert torch.equal(layer.lora_A, torch.zeros(2, 10)) and torch.equal(model(ids), base(ids))  # A = 0 as PEFT
    layer(ids).pow(2).sum().backward()
    assert torch.equal(layer.lora_A.grad[:, 0], torch.zeros(2))  # the pad column gets no gradient
    with torch.no_grad():
        layer.lora_A[:, 1:].normal_()
    delta = 2.0 * (layer.lora_B.double() @ layer.lora_A.double()).T  # (10, 6)
    torch.testing.assert_close(model(ids).double(), (layer.weight.double() + delta)[ids])
    assert torch.equal(model(ids)[0, 0], base(ids)[0, 0])  # pad row: W's
    lora.merge_lora(model)
    assert type(model[0]) is nn.Embedding and model[0].padding_idx == 0
    torch.testing.assert_close(model[0].weight.double(), base[0].weight.double() + delta)


def test_embedding_with_max_norm_and_dora_on_non_linear_layers_are_refused_naming_why():
    unchanged(lambda: nn.Sequential(nn.Embedding(10, 6, max_norm=1.0)), lambda m: lora.add_lora(m, r=2, targets="0"),
              TypeError, "max_norm=1.0.*renormalises W's rows in place")
    unchanged(lambda: nn.Sequential(nn.Embedding(10, 6)), lambda m: lora.add_lora(m, r=2, targets="0", use_dora=True),
              TypeError, "is a Embedding: use_dora=True wraps nn.Linear only")
    unchanged(lambda: nn.Sequential(nn.ConvTranspose2d(3, 3, 1)), lambda m: lora.add_lora(m, r=2, targets="0"),
              TypeError, "module '0' .* is a ConvTranspose2d; lora.py wraps nn.Linear, transformers' Conv1D, nn.Embed")


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.body, self.lm_head = nn.Embedding(12, 8), nn.Linear(8, 8), nn.Linear(8, 12, bias=False)
        self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.body(self.embed(ids)))


def test_a_tied_weight_is_refused_from_either_side_naming_both_modules_and_the_way_out():
    unchanged(TiedLM, lambda m: lora.add_lora(m, r=2, targets=["body", "lm_head"]), ValueError,
              r"'lm_head' .*shares its weight with \['embed'\] .*untie it first, e.g. model.lm_head.weight = ")
    unchanged(TiedLM, lambda m: lora.add_lora(m, r=2, targets="embed"), ValueError,
              r"'embed' .*shares its weight with \['lm_head'\]")


def test_targets_none_leaves_out_the_output_embeddings_as_peft_all_linear():
    model = TiedLM()
    assert lora.add_lora(model, r=2) == ["body"]
    with torch.no_grad():
        model.body.lora_B.normal_()
    ids = torch.randint(0, 12, (2, 5))
    before, embedding = model(ids), model.embed.weight.clone()
    lora.merge_lora(model)
    assert torch.equal(model.embed.weight, embedding) and model.lm_head.weight is model.embed.weight
    torch.testing.assert_close(model(ids), before)


class FakeQuantLinear(nn.Linear):
    def forward(self, x):  # computes with a rounded weight, as a quantized layer would
        return nn.functional.linear(x, (self.weight * 4).round() / 4, self.bias)


class PlainSubclass(nn.Linear):
    pass


def test_a_linear_subclass_with_its_own_forward_is_refused_and_one_without_is_wrapped():
    unchanged(lambda: nn.Sequential(FakeQuantLinear(4, 4)), lambda m: lora.add_lora(m, r=2), TypeError,
              r"'0' is a FakeQuantLinear, a subclass of nn.Linear with its own forward")
    model = nn.Sequential(PlainSubclass(4, 4))
    lora.add_lora(model, r=2)
    lora.merge_lora(model)
    assert type(model[0]) is PlainSubclass


def test_each_layer_class_refuses_the_other_kind_of_base_before_freezing_it():
    base = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="base is a Linear: wrap it with LoRALinear"):
        lora.LoRAEmbedding(base, r=2)
    with pytest.raises(TypeError, match="base is a Embedding: wrap it with LoRAEmbedding"):
        LoRALinear(nn.Embedding(4, 4), r=2)
    assert base.weight.requires_grad


def test_transformer_decoder_layer_adapters_count_in_eval_mode_too():
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    assert lora.add_lora(model, r=2) == ["self_attn", "multihead_attn", "linear1", "linear2"]
    with torch.no_grad():
        model.linear2.lora_B.normal_()
        model.multihead_attn.lora_B.normal_()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 4, 16)
    train_out = model.train()(x, memory)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, memory), train_out)
        with lora.disable_lora(model):
            assert (model(x, memory) - train_out).abs().max() > 1e-2


def test_transformer_encoder_adapter_counts_in_eval_mode_and_no_grad_after_training():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    base = copy.deepcopy(model).eval()
    assert lora.add_lora(model, r=4, targets=None) == [f"layers.{i}.{n}" for i in (0, 1)
                                                         for n in ("self_attn", "linear1", "linear2")]
    lora.mark_only_lora_as_trainable(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(3, 5, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    train_out = model.train()(x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), train_out)  # the fast path would give the base model's
        assert (model(x) - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(model(x), train_out)


def test_a_bf16_base_trains_float32_adapters_that_small_adam_steps_move():
    torch.manual_seed(0)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    moved = {}
    for adapter_dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        layer = LoRALinear(nn.Linear(32, 8, dtype=torch.bfloat16), r=4, adapter_dtype=adapter_dtype)
        with torch.no_grad():
            layer.lora_B.fill_(1.0)  # B at 1: an update of 1e-4 is below bfloat16's resolution there
        before = layer.lora_B.detach().clone()
        opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=1e-4)
        out = layer(x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).mean().backward()
        opt.step()
        moved[adapter_dtype] = (layer.lora_B != before).float().mean().item()
    assert moved[None] == 1.0 and moved[torch.bfloat16] == 0.0


def test_targets_match_dotted_ends_of_names_as_peft_does():
    assert lora.add_lora(Tiny(), r=2, targets="1.query") == ["layers.1.query"]
    assert lora.add_lora(Tiny(), r=2, targets=["0.query", "layers.1.value"]) == ["layers.0.query", "layers.1.value"]


# --- the workflow: train with the head, save, load into a fresh model -------------------------------------------

def test_saving_an_adapter_from_a_model_without_lora_raises():
    with pytest.raises(ValueError, match="has no LoRA layers to save: call lora.add_lora first"):
        lora.lora_state_dict(mlp())


def test_modules_to_save_must_match_and_cannot_be_a_lora_layer():
    model = Tiny()
    lora.add_lora(model, r=2, targets="query")
    unchanged(lambda: model, lambda m: lora.mark_only_lora_as_trainable(m, modules_to_save="classifier"),
              ValueError, "modules_to_save 'classifier' matches no module")
    with pytest.raises(ValueError, match=r"modules_to_save \['layers.0.query'.* carry LoRA"):
        lora.mark_only_lora_as_trainable(model, modules_to_save="query")


def trained_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    lora.add_lora(model, r=2, alpha=3, targets=["query", "value"], dropout=0.1, **kw)
    lora.mark_only_lora_as_trainable(model, bias="lora_only", modules_to_save=["head"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_out(model, x):
    h = x
    for block in model.layers:
        h = block.norm(block.query(h) + block.value(h))
    return model.head(h)


@pytest.mark.parametrize("how", ["torch", "safetensors"])
@pytest.mark.parametrize("use_dora, use_rslora", [(False, False), (True, True)])
def test_an_adapter_file_rebuilds_its_wrapping_in_a_fresh_model_with_the_trained_head(tmp_path, how, use_dora,
                                                                                       use_rslora):
    model = trained_tiny(use_dora=use_dora, use_rslora=use_rslora).eval()
    sd = lora.lora_state_dict(model)
    assert {"head.weight", "head.bias", "layers.0.query.bias"} <= set(sd)
    if how == "torch":
        torch.save(sd, tmp_path / "a.pt")
        loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    else:
        safetensors = pytest.importorskip("safetensors.torch")
        safetensors.save_file(sd, tmp_path / "a.safetensors")
        loaded = safetensors.load_file(tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = Tiny().eval()  # the pretrained model, never wrapped
    torch.manual_seed(7)
    nn.init.normal_(fresh.head.weight)  # and a new task's untrained head
    assert lora.load_lora_state_dict(fresh, loaded) == ["layers.0.query", "layers.0.value", "layers.1.query",
                                                        "layers.1.value"]
    x = torch.randn(4, 8)
    assert torch.equal(tiny_out(fresh, x), tiny_out(model, x))
    for (_, a), (_, b) in zip(lora.lora_layers(fresh), lora.lora_layers(model)):
        assert (a.r, a.alpha, a.dropout, a.use_rslora, a.use_dora, a.lora_A.dtype) == \
               (b.r, b.alpha, b.dropout, b.use_rslora, b.use_dora, b.lora_A.dtype)


def test_loading_into_a_fresh_model_refuses_mismatches_before_changing_anything():
    sd = lora.lora_state_dict(trained_tiny())
    wrong_rank = {**sd, "layers.0.query.lora_A": torch.zeros(3, 8)}
    unchanged(Tiny, lambda m: lora.load_lora_state_dict(m, wrong_rank), ValueError,
              r"'layers.0.query': the adapter's lora_B has shape \(8, 2\), but this layer at r=3 needs \(8, 3\)")
    wrong_head = {**sd, "head.weight": torch.zeros(3, 8)}
    unchanged(Tiny, lambda m: lora.load_lora_state_dict(m, wrong_head), ValueError, "shape mismatch for 'head.weight'")
    extra = {**sd, "classifier.weight": torch.zeros(2, 8)}
    unchanged(Tiny, lambda m: lora.load_lora_state_dict(m, extra), KeyError, r"unexpected keys \['classifier.weight'\]")
    unchanged(TiedLM, lambda m: lora.load_lora_state_dict(m, {"lm_head.lora_A": torch.zeros(2, 8),
              "lm_head.lora_B": torch.zeros(12, 2), "lm_head.lora_alpha": torch.tensor(2.0),
              "lm_head.lora_use_rslora": torch.tensor(False), "lm_head.lora_dropout": torch.tensor(0.0)}),
              ValueError, "'lm_head' \\(in the adapter\\).*shares its weight with \\['embed'\\]")


def test_an_adapter_from_the_older_format_loads_into_a_wrapped_model_and_is_refused_by_a_fresh_one():
    model = trained_tiny()
    old = {k: v for k, v in lora.lora_state_dict(model).items() if not k.endswith("lora_dropout")}
    unchanged(Tiny, lambda m: lora.load_lora_state_dict(m, old), ValueError,
              "saved by an older lora.py that did not record dropout: call add_lora")
    wrapped = Tiny()
    lora.add_lora(wrapped, r=2, alpha=3, targets=["query", "value"])
    lora.load_lora_state_dict(wrapped, old)
    assert torch.equal(wrapped.layers[1].value.lora_B, model.layers[1].value.lora_B)


def test_print_trainable_parameters_prints_counts_and_share(capsys):
    model = mlp()
    lora.add_lora(model, r=4)
    lora.mark_only_lora_as_trainable(model)
    lora.print_trainable_parameters(model)
    trainable, total = lora.count_parameters(model)
    assert capsys.readouterr().out == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")


# --- what an independent review found: each a silent error before, now an exact result or a refusal ---------------

def test_a_model_that_is_itself_a_linear_is_refused_not_given_an_adapter_it_never_calls():
    unchanged(lambda: nn.Linear(4, 4), lambda m: lora.add_lora(m, r=2), ValueError, "the model itself is a Linear")


def hooked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[0].register_forward_hook(lambda module, inputs, output: output * 0)
    return model


def test_a_layer_with_hooks_or_a_parametrized_weight_is_refused_naming_why():
    unchanged(hooked, lambda m: lora.add_lora(m, r=2, targets=["0"]), TypeError, "_forward_hooks")
    unchanged(hooked, lambda m: lora.add_lora(m, r=2), TypeError, "_forward_hooks")  # targets=None too

    def parametrized():
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        nn.utils.parametrizations.weight_norm(model[0])
        return model
    unchanged(parametrized, lambda m: lora.add_lora(m, r=2, targets=["0"]), TypeError, "parametrization")


def test_an_encoder_with_an_adapter_past_its_first_layer_runs_eval_with_a_padding_mask_as_in_train_mode():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                    enable_nested_tensor=True)
    lora.add_lora(encoder, r=2, targets=["layers.1.linear1"])
    for _, layer in lora.lora_layers(encoder):
        nn.init.normal_(layer.lora_B)
    x, mask = torch.randn(3, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    train_out = encoder.train()(x, src_key_padding_mask=mask)
    with torch.no_grad():
        eval_out = encoder.eval()(x, src_key_padding_mask=mask)
    keep = ~mask  # padded positions are undefined on the fast path (zeros) and the slow one alike
    torch.testing.assert_close(eval_out[keep], train_out.detach()[keep])


def test_a_fresh_model_loads_the_adapter_frozen_as_it_was_trained_and_bad_settings_change_nothing():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model = net()
    lora.add_lora(model, r=2, targets=["0"])
    lora.mark_only_lora_as_trainable(model, modules_to_save=["2"])
    state = lora.lora_state_dict(model)
    fresh = net()
    lora.load_lora_state_dict(fresh, state)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B", "2.weight", "2.bias"}
    for key, bad, match in (("0.lora_alpha", -1.0, "layer '0' of the adapter: alpha"),
                            ("0.lora_dropout", 1.0, "layer '0' of the adapter: dropout")):
        broken = {**state, key: torch.tensor(bad, dtype=torch.float64)}
        unchanged(net, lambda m: lora.load_lora_state_dict(m, broken), ValueError, match)


def test_float32_adapters_on_a_bf16_base_round_the_sum_once_as_peft_does():
    torch.manual_seed(0)
    base = nn.Linear(64, 64).to(torch.bfloat16)
    layer = lora.LoRALinear(base, r=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(32, 64, dtype=torch.bfloat16)
    exact = F.linear(x, base.weight, base.bias).float() + layer.scaling * (x.float() @ layer.lora_A.T) @ layer.lora_B.T
    assert torch.equal(layer(x), exact.to(torch.bfloat16))


# --- convolutions, PyTorch's attention, and what add_lora says --------------------------------------------------

def conv_delta(layer):
    """scaling · B ∘ A as a convolution weight, written independently of lora.py: B's 1×1 mixes A's r channels."""
    A, B = layer.lora_A.double(), layer.lora_B.double()
    return layer.scaling * torch.einsum("or,ri...->oi...", B.flatten(1), A)


@pytest.mark.parametrize("make, size", [
    (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 11)),
    (lambda: nn.Conv2d(3, 5, (3, 2), padding="same", dilation=2, padding_mode="circular"), (2, 3, 9, 8)),
    (lambda: nn.Conv3d(3, 5, 2, bias=False), (1, 3, 4, 5, 4))])
def test_a_convolution_adds_the_conv_of_scaling_B_A_with_the_base_settings_and_merges_to_the_same_outputs(make, size):
    torch.manual_seed(0)
    base = make().double()
    layer = lora.LoRAConv(copy.deepcopy(base), r=2, alpha=6)
    assert layer.lora_A.shape == (2, 3, *base.kernel_size) and layer.lora_B.shape == (5, 2, *[1] * len(size[2:]))
    x = torch.randn(size, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))  # B = 0: the base model, exactly
    nn.init.normal_(layer.lora_B)
    expected = base._conv_forward(x, base.weight + conv_delta(layer), base.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    adapters = (layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda A, B: torch.func.functional_call(layer, {"lora_A": A, "lora_B": B}, x),
                                    adapters)
    with lora.disable_lora(layer):
        assert torch.equal(layer(x), base(x))
    layer.eval().merge()
    torch.testing.assert_close(layer.weight, base.weight + conv_delta(layer), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_a_grouped_convolution_and_dora_on_a_convolution_are_refused_naming_why_and_the_way_forward():
    unchanged(lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), lambda m: lora.add_lora(m, r=2, targets="0"),
              TypeError, r"groups=2: B ∘ A is a dense .* could not merge; leave it out of targets and adapt the "
              "ungrouped convolutions beside it")
    unchanged(lambda: nn.Sequential(nn.Conv2d(4, 4, 3)), lambda m: lora.add_lora(m, r=2, targets="0", use_dora=True),
              TypeError, "is a Conv2d: use_dora=True wraps nn.Linear only .* second add_lora call with use_dora=False")


def test_resnet18_wraps_every_conv_and_fc_trains_a_step_saves_loads_into_a_fresh_model_and_merges():
    torchvision = pytest.importorskip("torchvision")

    def resnet():
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None, num_classes=10)
    model = resnet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out, nothing still training
        wrapped = lora.add_lora(model, r=4)
        lora.mark_only_lora_as_trainable(model)
        assert wrapped == [n for n, m in resnet().named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        model.train().apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)  # running stats stay
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x = torch.randn(2, 3, 32, 32)
        F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
        opt.step()
    out = model.eval()(x)
    assert not torch.allclose(out, resnet().eval()(x))
    fresh = resnet()
    lora.load_lora_state_dict(fresh, lora.lora_state_dict(model))
    assert torch.equal(fresh.eval()(x), out)
    merged = lora.merge_lora(fresh)
    assert [type(m) for m in merged.modules()] == [type(m) for m in resnet().modules()]
    torch.testing.assert_close(merged(x), out, rtol=1e-5, atol=1e-5)


def merged_copy(mha, layer):
    """An nn.MultiheadAttention holding W + ΔW in place, built from the wrapped layer's A and B by hand."""
    ref = copy.deepcopy(mha)
    with torch.no_grad():
        ref.in_proj_weight += layer.scaling * layer.lora_B @ layer.lora_A
        ref.out_proj.weight += layer.out_proj.scaling * layer.out_proj.lora_B @ layer.out_proj.lora_A
    return ref


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_computes_the_module_with_adapted_weights_in_training_eval_and_the_fast_path(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    layer = lora.LoRAMultiheadAttention(copy.deepcopy(mha), r=2, alpha=4)
    for p in (layer.lora_B, layer.out_proj.lora_B):
        nn.init.normal_(p)
    ref = merged_copy(mha, layer)
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])  # (batch, seq)
    if not batch_first:
        mask = mask[: 5]
    causal = nn.Transformer.generate_square_subsequent_mask(3 if not batch_first else 5)
    calls = [dict(), dict(need_weights=False), dict(attn_mask=causal, average_attn_weights=False)]
    if batch_first:
        calls.append(dict(key_padding_mask=mask, need_weights=False))  # with no_grad in eval: PyTorch's fast path
    for mode in ("train", "eval"):
        for kwargs in calls:
            for grad in (True, False):
                with torch.set_grad_enabled(grad):
                    ours, theirs = getattr(layer, mode)()(x, x, x, **kwargs), getattr(ref, mode)()(x, x, x, **kwargs)
                for a, b in zip(ours, theirs):
                    assert (a is None) == (b is None)
                    if a is not None:
                        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (layer(x, x, x)[0] - mha(x, x, x)[0]).abs().max() > 1e-2
    with lora.disable_lora(layer):
        torch.testing.assert_close(layer(x, x, x)[0], mha(x, x, x)[0])
    layer.merge()
    torch.testing.assert_close(layer.in_proj_weight, ref.in_proj_weight)
    torch.testing.assert_close(layer(x, x, x)[0], ref(x, x, x)[0], rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.in_proj_weight, mha.in_proj_weight)
    layer(x, x, x)[0].pow(2).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_B, layer.out_proj.lora_A,
                                                layer.out_proj.lora_B))
    assert layer.in_proj_weight.grad is None and layer.out_proj.weight.grad is None


def test_multihead_attention_gradients_equal_the_float64_closed_form_of_attention_with_W_plus_BA():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    layer = lora.LoRAMultiheadAttention(copy.deepcopy(mha), r=2)
    for p in (layer.lora_B, layer.out_proj.lora_B):
        nn.init.normal_(p)
    x = torch.randn(2, 4, 8, dtype=torch.float64)

    def closed_form(A, B, A_o, B_o):
        qkv = x @ (mha.in_proj_weight + B @ A).T + mha.in_proj_bias  # (N, L, 3E)
        q, k, v = (t.unflatten(-1, (2, 4)).transpose(1, 2) for t in qkv.chunk(3, -1))  # (N, heads, L, E / heads)
        heads = torch.softmax(q @ k.transpose(-1, -2) / 2, -1) @ v  # (N, heads, L, E / heads)
        return heads.transpose(1, 2).flatten(2) @ (mha.out_proj.weight + B_o @ A_o).T + mha.out_proj.bias
    adapters = [layer.lora_A, layer.lora_B, layer.out_proj.lora_A, layer.out_proj.lora_B]
    expected = torch.autograd.grad(closed_form(*adapters).pow(2).sum(), adapters)
    torch.testing.assert_close(layer(x, x, x)[0], closed_form(*adapters), rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(layer(x, x, x)[0].pow(2).sum(), adapters), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def fast_path_calls(monkeypatch):
    """Count the calls of PyTorch's fused encoder layer, which reads the weights itself."""
    calls, fused = [], torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or fused(*a))
    return calls


def test_self_attn_targets_on_an_encoder_count_in_eval_and_merge_lora_restores_its_fast_path(monkeypatch):
    torch.manual_seed(0)
    make = lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    untouched, model = make().eval(), make()
    model.load_state_dict(untouched.state_dict())
    flags = lambda m: [m.use_nested_tensor] + [layer.activation_relu_or_gelu for layer in m.layers]
    assert lora.add_lora(model, r=2, targets=["self_attn"]) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert flags(model) == [False, 0, 0] and flags(untouched) == [True, 1, 1]
    lora.mark_only_lora_as_trainable(model)
    for _, layer in lora.lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.2)
    x = torch.randn(3, 5, 16)
    calls = fast_path_calls(monkeypatch)
    train_out = model.train()(x)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), train_out)  # PyTorch's fast path would skip the adapter
        assert not calls and (train_out - untouched(x)).abs().max() > 0.1
    calls.clear()
    fresh = make()
    fresh.load_state_dict(untouched.state_dict())
    lora.load_lora_state_dict(fresh, lora.lora_state_dict(model))
    merged = lora.merge_lora(fresh.eval())
    assert flags(merged) == flags(untouched)
    assert [type(m) for m in merged.modules()] == [type(m) for m in untouched.modules()]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), train_out, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # merged, eval and no_grad: the fused layer again, as in the untouched model


def test_an_attention_with_its_own_kdim_and_dora_on_attention_are_refused_naming_why():
    unchanged(lambda: nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, kdim=4, vdim=4)}),
              lambda m: lora.add_lora(m, r=2, targets="attn"), TypeError, "kdim or vdim unlike embed_dim")
    unchanged(lambda: nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2)}),
              lambda m: lora.add_lora(m, r=2, targets="attn", use_dora=True), TypeError, "use_dora=True wraps")


def test_targets_none_warns_naming_the_kinds_and_counts_it_left_out():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 4, 2),
                          nn.Conv2d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"left out .*\{'Conv2d with groups > 1': 2, 'ConvTranspose2d': 1\}; name one"):
        assert lora.add_lora(model, r=2) == ["1", "5"]


def test_the_first_training_forward_warns_once_if_most_parameters_still_train_and_not_after_freezing():
    x = torch.randn(2, 784)
    frozen = mlp()
    lora.add_lora(frozen, r=2, targets="4")
    lora.mark_only_lora_as_trainable(frozen)
    forgot = mlp()
    lora.add_lora(forgot, r=2, targets="4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen(x)
        forgot.eval()(x)  # not training: no word yet
        with torch.no_grad():
            forgot.train()(x)
    with pytest.warns(UserWarning, match=r"54,538 of the model's 54,863 parameters train: add_lora froze only the "
                                         r"weights it wrapped. Call lora.mark_only_lora_as_trainable\(model\)") as rec:
        forgot(x)
        forgot(x)
    assert len(rec) == 1

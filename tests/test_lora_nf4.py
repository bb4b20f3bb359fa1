"""QLoRA: lora.py over nf4.py's LinearNF4, against the closed form, against PEFT's LoRA on bitsandbytes' Linear4bit
(which runs on the CPU), and through PEFT's adapter files both ways.

bitsandbytes and peft are test-only dependencies: the tests that run them skip where they are absent. The comparisons
with bitsandbytes quantize without double quantization (compress_statistics=False): with it, bitsandbytes' native CPU
kernel rounds a few of the 8-bit absmax codes differently (tests/test_nf4.py says how), which would make the two
bases differ, not the adapters. CPU, seconds.
"""

import copy
import io
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import nf4


class Net(nn.Module):
    """Wq and Wv (one with a bias, one without), and a head that stays in full precision."""

    def __init__(self):
        super().__init__()
        self.query = nn.Linear(64, 64)
        self.value = nn.Linear(64, 64, bias=False)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.query(x) + self.value(x)))


def quantized(dtype=torch.float32, double_quant=True, seed=0):
    """(a Net with query and value in NF4, the float Net it was quantized from)."""
    torch.manual_seed(seed)
    base = Net().to(dtype)
    model = copy.deepcopy(base)
    nf4.quantize_model(model, targets=["query", "value"], double_quant=double_quant)
    return model, base


def perturb(model, seed=1):
    """Move A and B as training would (B leaves zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            layer.lora_A.add_(torch.randn_like(layer.lora_A) * 0.2)
            layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.2)


def qlora(dtype=torch.float32, double_quant=True, r=4, alpha=8):
    model, base = quantized(dtype, double_quant)
    lora.add_lora(model, r=r, alpha=alpha, targets=["query", "value"])
    perturb(model)
    return model, base


# ─── the layer ────────────────────────────────────────────────────────────────────────────────────────────────

def test_add_lora_wraps_linear_nf4_and_training_starts_at_the_quantized_model():
    model, _ = quantized()
    x = torch.randn(5, 64)
    before = model(x)
    assert lora.add_lora(model, r=4, targets=["query", "value"]) == ["query", "value"]
    assert isinstance(model.query, lora.LoRALinear) and model.query.kind == "nf4"
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_is_the_4bit_base_output_plus_the_update_added_in_float32(dtype):
    model, _ = qlora(dtype)
    layer = model.query
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32  # float32 adapters by default
    x = torch.randn(7, 64).to(dtype)
    base = F.linear(x, nf4.dequantize_nf4(layer.weight), layer.bias)  # the 4-bit base: dequantized W x + b
    update = layer.scaling * (x.float() @ layer.lora_A.T @ layer.lora_B.T)  # (N, in) @ (in, r) @ (r, out)
    expected = (base + update).to(dtype)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0 if dtype != torch.float32 else 1e-6)


def test_only_a_and_b_train_and_get_gradients():
    model, _ = qlora()
    lora.mark_only_lora_as_trainable(model)
    model(torch.randn(6, 64)).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"}
    assert lora.count_parameters(model)[0] == 2 * (4 * 64 + 64 * 4)


def test_qlora_trains_under_bf16_autocast():
    """The usual QLoRA step: float32 adapters, bf16 autocast (the gradient reaching the 4-bit base's backward is
    bf16). A and B get the gradients of the float32 step, to bf16's rounding."""
    model, _ = qlora()
    lora.mark_only_lora_as_trainable(model)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    grads = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().sum()
        loss.backward()
        grads.append([p.grad.clone() for p in (model.query.lora_A, model.value.lora_B)])
    for exact, amp in zip(*grads):
        assert amp.dtype == torch.float32
        torch.testing.assert_close(amp, exact, rtol=0, atol=0.03 * exact.abs().max().item())


def test_the_training_step_keeps_no_dequantized_weight_for_backward():
    model, _ = qlora()
    lora.mark_only_lora_as_trainable(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        model(torch.randn(6, 64, requires_grad=True)).sum().backward()
    assert (64, 64) not in saved and model.query.lora_A.grad is not None


def test_the_4bit_weights_count_as_frozen_in_the_warning_that_most_parameters_train():
    model, _ = qlora()
    lora.mark_only_lora_as_trainable(model)  # adapters: 2 * 512 parameters; the 4-bit weights: 2 * 4096 values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 64))


def test_the_base_keeps_its_state_dict_names():
    model, _ = quantized()
    before = model.state_dict()
    lora.add_lora(model, r=4, targets=["query", "value"])
    after = model.state_dict()
    assert set(before) <= set(after) and "query.weight.packed" in after
    model.load_state_dict(before, strict=False)  # a checkpoint of the quantized model loads after add_lora
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_targets_none_wraps_linear_nf4_too():
    model, _ = quantized()
    with pytest.warns(UserWarning, match="exceeds"):  # the 64 -> 3 head, at r=4
        assert lora.add_lora(model, r=4) == ["query", "value", "head"]


def test_disable_lora_gives_the_4bit_base():
    model, _ = qlora()
    x = torch.randn(3, 64)
    with lora.disable_lora(model):
        off = model(x)
    assert torch.equal(off, quantized()[0](x))


def test_merge_in_place_is_refused_with_the_reason():
    model, _ = qlora()
    with pytest.raises(TypeError, match="4-bit weight, rounding it to NF4 again"):
        model.query.merge()
    assert not model.query.merged


def test_dora_is_refused_on_linear_nf4():
    model, _ = quantized()
    with pytest.raises(TypeError, match="use_dora=True wraps nn.Linear only"):
        lora.add_lora(model, r=4, targets=["query"], use_dora=True)


# ─── merging ──────────────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_lora_gives_an_nn_linear_of_the_dequantized_weight_plus_the_update(dtype):
    model, base = qlora(dtype)
    layer = model.query
    want = (nf4.dequantize_nf4(layer.weight).float() + layer.scaling * layer.lora_B @ layer.lora_A).to(dtype)
    x = torch.randn(5, 64).to(dtype)
    adapted = model(x)
    lora.merge_lora(model)
    assert type(model.query) is nn.Linear and type(model.value) is nn.Linear
    assert model.query.weight.dtype == dtype and torch.equal(model.query.weight, want)
    assert torch.equal(model.query.bias, base.query.bias) and model.value.bias is None
    assert not torch.equal(model.query.weight, (base.query.weight.float() + layer.scaling * layer.lora_B
                                                @ layer.lora_A).to(dtype))  # never the unquantized W
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(model(x), adapted, rtol=tol, atol=tol)


# ─── saving and loading ───────────────────────────────────────────────────────────────────────────────────────

def test_lora_state_dict_leaves_the_4bit_base_out_and_loads_into_a_freshly_quantized_model_exactly():
    model, _ = qlora()
    lora.mark_only_lora_as_trainable(model)
    state = lora.lora_state_dict(model)
    assert {k.partition(".")[2] for k in state} == {"lora_A", "lora_B", "lora_alpha", "lora_use_rslora",
                                                    "lora_dropout"}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh, _ = quantized()
    lora.load_lora_state_dict(fresh, torch.load(buffer, weights_only=True))
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


# ─── against PEFT's LoRA on bitsandbytes' Linear4bit ──────────────────────────────────────────────────────────

def bnb_model(base):
    """`base` with query and value as bitsandbytes' Linear4bit (NF4, float32 compute, no double quantization),
    marked as transformers marks a 4-bit model, so that PEFT wraps them with its bitsandbytes LoRA layer."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (test-only) is not installed")
    import bitsandbytes as bnb
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model = copy.deepcopy(base)
    for name in ("query", "value"):
        lin = getattr(base, name)
        layer = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, compress_statistics=False, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=False, blocksize=64)
        if lin.bias is not None:
            layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        # In eval mode without grad, on a CPU with AVX512-BF16, Linear4bit would repack its weight for good and
        # compute in bfloat16 (an error of ~1e-2 here): we compare float32 with float32.
        layer.support_avx512bf16_for_cpu = False
        setattr(model, name, layer.to("cpu"))  # .to() quantizes
    model.is_loaded_in_4bit = True
    return model


def test_linear_nf4_computes_what_bitsandbytes_linear4bit_computes():
    model, base = quantized(double_quant=False)
    theirs = bnb_model(base)
    x = torch.randn(9, 64)
    assert torch.equal(model.query(x), theirs.query(x)) and torch.equal(model.value(x), theirs.value(x))


def test_matches_peft_lora_on_bitsandbytes_linear4bit_in_outputs_and_gradients():
    peft = pytest.importorskip("peft")
    model, base = quantized(double_quant=False)
    theirs = bnb_model(base)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    assert type(theirs.base_model.model.query).__module__ == "peft.tuners.lora.bnb"  # PEFT's 4-bit LoRA layer
    lora.add_lora(model, r=4, alpha=8, targets=["query", "value"])
    perturb(model)
    with torch.no_grad():
        for name in ("query", "value"):
            peft_layer = getattr(theirs.base_model.model, name)
            peft_layer.lora_A["default"].weight.copy_(getattr(model, name).lora_A)
            peft_layer.lora_B["default"].weight.copy_(getattr(model, name).lora_B)
    x = torch.randn(9, 64)
    ours_out, theirs_out = model(x), theirs(x)
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-6, atol=1e-6)
    ours_out.square().sum().backward()
    theirs_out.square().sum().backward()
    for name in ("query", "value"):
        peft_layer = getattr(theirs.base_model.model, name)
        torch.testing.assert_close(getattr(model, name).lora_A.grad, peft_layer.lora_A["default"].weight.grad,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(getattr(model, name).lora_B.grad, peft_layer.lora_B["default"].weight.grad,
                                   rtol=1e-5, atol=1e-6)


def test_peft_adapter_files_move_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    import lora_peft
    ours, base = qlora(double_quant=False)
    x = torch.randn(5, 64)
    lora_peft.save_peft_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(bnb_model(base), tmp_path / "ours").eval()
    torch.testing.assert_close(in_peft(x), ours(x), rtol=1e-6, atol=1e-6)

    theirs = peft.get_peft_model(bnb_model(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                  target_modules=["query", "value"]))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    theirs.save_pretrained(tmp_path / "theirs")
    fresh, _ = quantized(double_quant=False)
    assert lora_peft.load_peft_adapter(fresh, tmp_path / "theirs") == ["query", "value"]
    torch.testing.assert_close(fresh(x), theirs(x), rtol=1e-6, atol=1e-6)


def test_other_quantized_layers_are_still_refused():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (test-only) is not installed")
    model = bnb_model(Net())
    with pytest.raises(TypeError, match="its own forward"):
        lora.add_lora(model, r=4, targets=["query"])


# ─── the notebook ─────────────────────────────────────────────────────────────────────────────────────────────

def test_the_qlora_notebook_runs_top_to_bottom_and_the_committed_one_ran_in_order(tmp_path, monkeypatch):
    """lora_qlora.ipynb on the CPU (seconds; it needs the MiniLM files of `make data`), writing under tmp_path."""
    import nbformat
    from nbclient import NotebookClient
    from experiments import storage
    path = storage.ROOT / "lora_qlora.ipynb"
    committed = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert [c.execution_count for c in committed] == list(range(1, len(committed) + 1))
    assert not [o for c in committed for o in c.outputs if o.output_type == "error"]
    monkeypatch.setenv("LORA_OUT_DIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(storage.ROOT)}}).execute()
    assert (tmp_path / "results" / "nf4_codebook.png").is_file()


def test_the_qlora_notebooks_prose_numbers_are_its_outputs():
    """Every number the committed notebook's text (and nf4.py's docstring) states is one a cell printed."""
    import re
    import nbformat
    from experiments import storage
    cells = nbformat.read(storage.ROOT / "lora_qlora.ipynb", as_version=4).cells
    prose = " ".join(" ".join(c.source for c in cells if c.cell_type == "markdown").split())
    printed = "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)
    source = "".join(c.source for c in cells if c.cell_type == "code")
    found = lambda pattern: re.search(pattern, printed)
    tail = float(found(r"Φ⁻¹\(offset\) = ([\d.]+)")[1])
    assert f"\\Phi^{{-1}}(0.9677083) \\approx {tail:.3f}" in prose and f"±1 at {tail:.3f}σ" in prose
    designed = found(r"designed for ([\d.]+)")[1]
    assert f"1/{tail:.3f} = {designed}" in prose
    above, below = found(r"mass per gap ([\d.]+) above 0, ([\d.]+) below").groups()
    assert f"the gaps hold {above} and {below}" in " ".join((storage.ROOT / "nf4.py").read_text().split())
    outlier, scales = found(r"largest \|w\| / std: (\d+)")[1], found(r"\+ ([\d,]+) float32 scales")[1]
    assert f"about {outlier} standard deviations out" in prose
    assert f"the {scales.replace(',', '')} absmax values" in prose
    saved_bits = found(r"double quantization saves ([\d.]+) bits")[1]
    assert f"saves about {saved_bits[:4]} bits per weight" in prose
    assert found(r"33 of the 36 dequantized") and "Three of the 36 are not kept" in prose
    batch = re.search(r"tokens = torch.randint\(1000, 5000, \((\d+), (\d+)\)\)", source)
    assert f"One step at batch {batch[1]} × {batch[2]} tokens" in prose
    assert float(found(r"4-bit ones included: ([\d.]+)%")[1]) < 1 and "under 1% of the parameters (section 8)" in prose
    dq64, dq64_error, b256, b256_error, more = found(
        r"blocks of 64, double quant.: ([\d.]+) bits, ([\d.]+)% error; blocks of 256, none: ([\d.]+) bits, ([\d.]+)%: "
        r"([\d.]+) bits more").groups()
    assert f"{dq64} against {b256}, {more} bits more, for an error of {dq64_error}% against {b256_error}%" in prose
    table_bits = re.search(r"^64\s+[\d.]+\s+[\d.]+%\s+([\d.]+)", printed, re.MULTILINE)[1]
    matrix_bits = found(r"double_quant=True : ([\d.]+) bits")[1]
    model_bits = found(r"MiB in NF4, ([\d.]+) bits per weight")[1]
    assert f"{table_bits} (section 7" in prose and f"{matrix_bits} (one 384 × 384" in prose
    assert f"{model_bits} (all 36 linears" in prose and f"section 6's {matrix_bits} includes it" in prose
    bench = (storage.ROOT / "bench" / "RESULTS.md").read_text().split("### QLoRA: the LoRA step over an NF4 base")[1]
    assert "d_in = d_out = 4096, 4096 tokens, bf16 compute" in bench and "(one 4096 × 4096 layer, 4096 tokens, bf16" in prose

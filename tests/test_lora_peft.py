"""lora.py, lora_peft.py and Hugging Face PEFT: the same layer numbers, and adapters that move both ways.

PEFT is a test-only dependency: tests that run it skip where it is absent. The checks of our own reader and
writer need only safetensors. Every model here has random weights; nothing is downloaded. CPU, seconds.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear

pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

import lora_peft  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """A small model to fine-tune: two Linear layers with a LayerNorm between them, and a named head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


class Holder(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def perturb(model, seed=1):
    """Move every trainable parameter, as training would (B leaves zero, DoRA's m leaves ‖W‖, heads move)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# What each variant trains, in lora.py's words; the same variants in PEFT's words are below.
def _ours(r=4, alpha=8, bias="none", head=False, **kw):
    def wrap(model):
        lora.add_lora(model, r=r, alpha=alpha, targets=["body.0", "body.3"], **kw)
        lora.mark_only_lora_as_trainable(model, bias=bias)
        if head:
            model.head.requires_grad_(True)
    return wrap


def _patterns(model):  # two layers with different r and alpha: PEFT's rank_pattern and alpha_pattern
    lora.add_lora(model, r=4, alpha=8, targets="body.0")
    lora.add_lora(model, r=2, alpha=3, targets="body.3")
    lora.mark_only_lora_as_trainable(model)


OURS = {"lora": _ours(), "rslora": _ours(use_rslora=True), "dora": _ours(use_dora=True),
        "head": _ours(head=True), "bias_all": _ours(bias="all"), "bias_lora_only": _ours(bias="lora_only"),
        "dora_head_bias": _ours(use_dora=True, head=True, bias="lora_only"), "patterns": _patterns}


def trained_ours(variant):
    """(our model after `variant` and some training, the same base model untouched), both in eval mode."""
    torch.manual_seed(0)
    base = Net().eval()
    model = copy.deepcopy(base)
    OURS[variant](model)
    perturb(model)
    return model, base


# --- one layer, the same numbers ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_dora", [False, True])
def test_our_layer_matches_peft_layer_in_output_gradients_and_merged_weight(use_dora):
    """Same W, A, B (and magnitude): the same output, gradients and merged weight as PEFT's layer, in float64,
    in training mode with dropout (both draw the same mask from the same seed)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Linear(32, 24).double()
    ours = LoRALinear(copy.deepcopy(base), r=4, alpha=8, dropout=0.3, use_dora=use_dora).train()
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.5)
        if use_dora:
            ours.lora_magnitude.mul_(torch.empty(24, dtype=torch.float64).uniform_(0.5, 1.5))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["proj"], use_dora=use_dora)
    theirs = peft.get_peft_model(Holder(copy.deepcopy(base)), config).base_model.model.proj.train()
    pairs = [(ours.lora_A, theirs.lora_A["default"].weight), (ours.lora_B, theirs.lora_B["default"].weight)]
    if use_dora:
        pairs.append((ours.lora_magnitude, theirs.lora_magnitude_vector["default"].weight))
    with torch.no_grad():
        for mine, their in pairs:
            their.copy_(mine)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    gy = torch.randn(2, 7, 24, dtype=torch.float64)
    outputs, x_grads = [], []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = layer(xi)
        out.backward(gy)
        outputs.append(out)
        x_grads.append(xi.grad)
    assert not torch.allclose(outputs[0], base(x))  # the adapter does something
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_grads[0], x_grads[1], rtol=1e-12, atol=1e-12)
    for mine, their in pairs:
        torch.testing.assert_close(mine.grad, their.grad, rtol=1e-12, atol=1e-12)
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-12, atol=1e-12)


# --- our adapters in PEFT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(OURS))
def test_peft_loads_our_adapter_and_gives_our_outputs(tmp_path, variant):
    peft = pytest.importorskip("peft")
    model, base = trained_ours(variant)
    x = torch.randn(5, 12)
    base_out = base(x)
    lora_peft.save_peft_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert not torch.allclose(model(x), base_out, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


def test_our_adapter_config_says_what_peft_needs(tmp_path):
    model, _ = trained_ours("patterns")
    model.head.requires_grad_(True)
    lora_peft.save_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "use_dora", "use_rslora",
                                   "bias", "modules_to_save", "rank_pattern", "alpha_pattern")} == {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["body.0", "body.3"], "use_dora": False,
        "use_rslora": False, "bias": "none", "modules_to_save": ["head"],
        "rank_pattern": {r"^body\.3": 2}, "alpha_pattern": {r"^body\.3": 3}}
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        f"base_model.model.body.{i}.lora_{m}.weight" for i in (0, 3) for m in "AB"} | {
        "base_model.model.head.weight", "base_model.model.head.bias"}


def test_targets_that_are_the_dotted_end_of_other_names_are_written_as_an_exact_regex(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    linear = lambda: nn.Sequential(nn.Linear(6, 6))
    base = nn.ModuleDict({"a": linear(), "x": nn.ModuleDict({"a": linear()})})  # "a.0" and "x.a.0"
    model = copy.deepcopy(base)
    assert lora.add_lora(model, r=2, targets="a.*") == ["a.0"]  # "a.0" would match "x.a.0" too, as in PEFT
    lora_peft.save_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == r"(a\.0)"
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert [n for n, m in loaded.named_modules() if n.endswith("lora_A")] == ["base_model.model.a.0.lora_A"]


# --- PEFT's adapters in ours ---------------------------------------------------------------------------------

PEFT_CONFIGS = {
    "lora": dict(target_modules=["body.0", "body.3"]),
    "rslora": dict(target_modules=["body.0", "body.3"], use_rslora=True),
    "dora": dict(target_modules=["body.0", "body.3"], use_dora=True),
    "head": dict(target_modules=["body.0", "body.3"], modules_to_save=["head"]),
    "bias_all": dict(target_modules=["body.0", "body.3"], bias="all"),
    "bias_lora_only": dict(target_modules=["body.0", "body.3"], bias="lora_only", use_dora=True),
    "patterns": dict(target_modules=["body.0", "body.3"], rank_pattern={"body.3": 2}, alpha_pattern={"3": 5}),
    "regex": dict(target_modules=r"body\.(0|3)", lora_dropout=0.1),
    "all_linear": dict(target_modules="all-linear"),
}


def peft_name_in_ours(name):
    """A PEFT parameter name as lora.py names the same tensor."""
    name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "").replace(".base_layer", "")
    for theirs, ours in ((".lora_A.default.weight", ".lora_A"), (".lora_B.default.weight", ".lora_B"),
                         (".lora_magnitude_vector.default.weight", ".lora_magnitude")):
        name = name.replace(theirs, ours)
    return name


@pytest.mark.filterwarnings("ignore:r=4 exceeds min")  # all-linear also wraps the 16 -> 3 head
@pytest.mark.parametrize("variant", list(PEFT_CONFIGS))
def test_we_load_peft_adapters_with_peft_outputs_and_what_peft_trains(tmp_path, variant):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = Net().eval()
    ours = copy.deepcopy(base)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, **PEFT_CONFIGS[variant]))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    names = lora_peft.load_peft_adapter(ours, tmp_path)
    assert names == sorted({n.split(".lora_A")[0].removeprefix("base_model.model.")
                            for n, _ in theirs.named_parameters() if ".lora_A." in n})
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)
    assert trainable(ours) == {peft_name_in_ours(n) for n in trainable(theirs)}


def test_an_adapter_round_trips_through_our_writer_and_reader_exactly(tmp_path):
    for variant in OURS:
        model, base = trained_ours(variant)
        lora_peft.save_peft_adapter(model, tmp_path / variant)
        lora_peft.load_peft_adapter(base, tmp_path / variant)
        x = torch.randn(5, 12)
        assert torch.equal(base(x), model(x)), variant
        assert trainable(base) == trainable(model), variant
        assert [(n, type(m)) for n, m in base.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]


# --- a transformers model, both ways ---------------------------------------------------------------------------

def tiny_bert():
    """BERT's architecture, small, with random weights and a 3-way classifier head (nothing is downloaded)."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_bert_adapter_with_a_trained_classifier_moves_both_ways_with_the_same_logits(tmp_path, use_dora):
    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    ids = torch.randint(5, 100, (2, 9))
    ours = tiny_bert()
    lora.add_lora(ours, r=4, alpha=8, targets=["query", "value"], use_dora=use_dora)
    lora.mark_only_lora_as_trainable(ours)
    ours.classifier.requires_grad_(True)
    perturb(ours)
    lora_peft.save_peft_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(in_peft(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-6)

    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"],
                             use_dora=use_dora)  # SEQ_CLS: PEFT adds ["classifier", "score"] to modules_to_save
    theirs = peft.get_peft_model(tiny_bert(), config)
    perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = tiny_bert()
    assert len(lora_peft.load_peft_adapter(in_ours, tmp_path / "theirs")) == 4
    torch.testing.assert_close(in_ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-6)


# --- what load_peft_adapter refuses, leaving the model as it was ------------------------------------------------

def edit_adapter(folder, config=None, drop=(), add=None):
    """Change a saved adapter: update its config, drop tensors, add tensors (full PEFT names)."""
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    tensors = {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if k not in drop}
    save_file({**tensors, **(add or {})}, folder / "adapter_model.safetensors")


P = "base_model.model."
REFUSALS = {  # name: (how the adapter is edited, exception, message)
    "unknown_peft_type": (dict(config={"peft_type": "IA3"}), ValueError, "peft_type 'IA3' is not supported"),
    "lora_bias": (dict(config={"lora_bias": True}), ValueError, r"\{'lora_bias': True\} are not supported"),
    "layers_to_transform": (dict(config={"layers_to_transform": [0]}), ValueError, "layers_to_transform"),
    "use_qalora": (dict(config={"use_qalora": True}), ValueError, "use_qalora"),
    "a_future_setting": (dict(config={"use_something_new": {"k": 1}}), ValueError, "use_something_new"),
    "pissa_init": (dict(config={"init_lora_weights": "pissa"}), ValueError, "init_lora_weights='pissa'"),
    "bad_bias_setting": (dict(config={"bias": "some"}), ValueError, "bias='some'"),
    "target_not_linear": (dict(add={P + "body.1.lora_A.weight": torch.zeros(4, 16),
                                    P + "body.1.lora_B.weight": torch.zeros(16, 4)}),
                          TypeError, r"module 'body.1' \(in the adapter\) is a LayerNorm; lora.py wraps nn.Linear"),
    "module_the_model_lacks": (dict(add={P + "body.9.lora_A.weight": torch.zeros(4, 16)}), ValueError,
                               "tensors for module 'body.9', which the model lacks"),
    "missing_lora_B": (dict(drop=[P + "body.3.lora_B.weight"]), ValueError,
                       r"'body.3': the adapter lacks its \['lora_B'\]"),
    "missing_magnitudes": (dict(config={"use_dora": True}), ValueError,
                           r"'body.0': the adapter lacks its \['lora_magnitude'\] \(use_dora=True\)"),
    "wrong_rank": (dict(config={"r": 2}), ValueError, r"'body.0': lora_A has shape \(4, 12\), but r=2"),
    "wrong_shape": (dict(add={P + "body.0.lora_B.weight": torch.zeros(15, 4)}), ValueError,
                    r"'body.0': lora_B has shape \(15, 4\).*need \(16, 4\)"),
    "base_weight": (dict(add={P + "body.0.weight": torch.zeros(16, 12)}), ValueError,
                    "'base_model.model.body.0.weight' is neither lora_A"),
    "bias_the_model_lacks": (dict(add={P + "body.2.bias": torch.zeros(16)}), ValueError,
                             "tensor 'body.2.bias', which the model lacks"),
    "lora_bias_named_as_plain": (dict(add={P + "body.0.bias": torch.zeros(16)}), ValueError,
                                 r"biases of \['body.0'\]: PEFT names .* <path>.base_layer.bias"),
    "head_without_tensors": (dict(config={"modules_to_save": ["head"]}), ValueError,
                             r"modules_to_save module 'head': the adapter lacks \['head.weight', 'head.bias'\]"),
    "target_without_tensors": (dict(config={"target_modules": ["body.0", "body.3", "head"]}), ValueError,
                               r"select \['head'\], but the adapter has no tensors for them"),
    "tensors_not_targeted": (dict(config={"target_modules": ["body.0"]}), ValueError,
                             "tensors for 'body.3', which its target_modules"),
}


def unchanged(model, call, exc, match):
    """call(model) raises exc and leaves the model's modules, tensors and trainable flags exactly as they were."""
    modules = [(n, type(m)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = trainable(model)
    with pytest.raises(exc, match=match):
        call(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert trainable(model) == flags


@pytest.mark.parametrize("name", list(REFUSALS))
def test_load_peft_adapter_refuses_what_it_cannot_honour_and_changes_nothing(tmp_path, name):
    edit, exc, match = REFUSALS[name]
    model, base = trained_ours("lora")
    lora_peft.save_peft_adapter(model, tmp_path)
    edit_adapter(tmp_path, **edit)
    unchanged(base, lambda m: lora_peft.load_peft_adapter(m, tmp_path), exc, match)


def test_load_peft_adapter_refuses_a_folder_of_several_adapters_and_a_model_that_has_lora(tmp_path):
    model, base = trained_ours("lora")
    lora_peft.save_peft_adapter(model, tmp_path)
    unchanged(model, lambda m: lora_peft.load_peft_adapter(m, tmp_path), ValueError, "already carries LoRA layers")
    lora_peft.save_peft_adapter(model, tmp_path / "second")  # PEFT's save_pretrained puts a second adapter here
    unchanged(base, lambda m: lora_peft.load_peft_adapter(m, tmp_path), ValueError,
              r"holds several adapters \(also \['second'\]\)")


# --- what save_peft_adapter refuses, writing nothing --------------------------------------------------------

def _merged(model):
    model.body[0].merge()


def _mixed_dora(model):
    lora.add_lora(model, r=2, targets="head", use_dora=True)


def _half_trained_norm(model):
    model.body[1].weight.requires_grad_(True)


def _head_bias_only(model):
    model.head.bias.requires_grad_(True)


def _trained_base_weight(model):
    model.body[0].weight.requires_grad_(True)


SAVE_REFUSALS = {
    "merged": (_merged, r"layers \['body.0'\] are merged"),
    "mixed_dora": (_mixed_dora, "one use_dora for all layers"),
    "partly_trained_module": (_half_trained_norm, r"'body.1' trains some of its parameters but not \['bias'\]"),
    "odd_biases": (_head_bias_only, r"trainable biases \['head.bias'\] are neither every bias"),
    "trained_base_weight": (_trained_base_weight, "'body.0' trains its base weight W"),
}


@pytest.mark.parametrize("name", list(SAVE_REFUSALS))
def test_save_peft_adapter_refuses_what_peft_cannot_hold_and_writes_nothing(tmp_path, name):
    change, match = SAVE_REFUSALS[name]
    model, _ = trained_ours("lora")
    change(model)
    with pytest.raises(ValueError, match=match):
        lora_peft.save_peft_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_peft.save_peft_adapter(Net(), tmp_path / "adapter")


def test_lora_py_imports_neither_safetensors_nor_peft_and_lora_peft_imports_no_peft():
    code = ("import sys, lora; assert not {'safetensors', 'peft', 'transformers'} & set(sys.modules), sys.modules; "
            "import lora_peft; assert not {'peft', 'transformers'} & set(sys.modules), sys.modules")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# --- GPT-2, Llama and BERT from transformers, against PEFT ---------------------------------------------------------

def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()


def tiny_llama(tied=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "llama_tied": lambda: tiny_llama(tied=True), "bert": tiny_bert}
IDS = torch.tensor([[3, 7, 11, 2, 9, 4], [5, 1, 8, 8, 6, 2]])


def peft_layers(model):
    from peft.tuners.lora import LoraLayer
    return [n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def logits(model):
    return model(input_ids=IDS).logits


@pytest.mark.parametrize("name", list(MODELS))
def test_targets_none_selects_what_peft_all_linear_selects(name):
    peft = pytest.importorskip("peft")
    ours, theirs = MODELS[name](), MODELS[name]()
    wrapped = lora.add_lora(ours, r=2)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(wrapped) == sorted(peft_layers(theirs))
    assert not any("lm_head" in n for n in wrapped)


def copy_adapters_into_peft(ours, theirs):
    """Give PEFT's layers our A, B: the same adapter in both implementations."""
    for n, layer in lora.lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(n)
        with torch.no_grad():
            if isinstance(layer, lora.LoRAEmbedding):
                peft_layer.lora_embedding_A["default"].copy_(layer.lora_A)
                peft_layer.lora_embedding_B["default"].copy_(layer.lora_B)
            else:
                peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
                peft_layer.lora_B["default"].weight.copy_(layer.lora_B)


@pytest.mark.parametrize("name, targets", [("gpt2", None), ("llama", ["embed_tokens", "q_proj", "v_proj"])])
def test_gpt2_conv1d_and_llama_embedding_match_peft_in_logits_gradients_and_merged_weights(name, targets):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    ours = MODELS[name]()
    wrapped = lora.add_lora(ours, r=4, alpha=8, targets=targets)
    for _, layer in lora.lora_layers(ours):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3)
            layer.lora_A.normal_(0, 0.3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or "all-linear",
                             fan_in_fan_out=name == "gpt2")
    theirs = peft.get_peft_model(MODELS[name](), config)
    copy_adapters_into_peft(ours, theirs)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    logits(ours).pow(2).mean().backward()
    logits(theirs).pow(2).mean().backward()
    for n in wrapped:
        layer, peft_layer = ours.get_submodule(n), theirs.base_model.model.get_submodule(n)
        embedding = n.endswith("embed_tokens")
        a = peft_layer.lora_embedding_A["default"] if embedding else peft_layer.lora_A["default"].weight
        torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=1e-4, atol=1e-6)
    merged, peft_merged = lora.merge_lora(ours), theirs.merge_and_unload()
    assert [type(m) for m in merged.modules()] == [type(m) for m in peft_merged.modules()]
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, peft_merged.state_dict()[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, targets", [("gpt2", None), ("llama", ["embed_tokens", "q_proj", "v_proj"])])
def test_gpt2_and_llama_embedding_adapters_move_both_ways_with_peft(tmp_path, name, targets):
    peft = pytest.importorskip("peft")
    ours = MODELS[name]()
    lora.add_lora(ours, r=4, alpha=8, targets=targets)
    perturb(ours)
    lora_peft.save_peft_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == (name == "gpt2")
    in_peft = peft.PeftModel.from_pretrained(MODELS[name](), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(in_peft), logits(ours), rtol=1e-5, atol=1e-5)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets or "all-linear", fan_in_fan_out=name == "gpt2")
    theirs = peft.get_peft_model(MODELS[name](), config)
    perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = MODELS[name]()
    lora_peft.load_peft_adapter(in_ours, tmp_path / "theirs")
    torch.testing.assert_close(logits(in_ours), logits(theirs.eval()), rtol=1e-5, atol=1e-5)


def test_a_tied_llama_refuses_lora_on_its_embedding_naming_the_output_layer():
    model = tiny_llama(tied=True)
    with pytest.raises(ValueError, match=r"'model.embed_tokens' .*shares its weight with \['lm_head'\]"):
        lora.add_lora(model, r=2, targets="embed_tokens")
    assert not list(lora.lora_layers(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_peft_adapter_loads_as_float32(tmp_path, dtype):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama().to(dtype), peft.LoraConfig(r=2, target_modules=["q_proj"]),
                                 autocast_adapter_dtype=False)
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].dtype == dtype
    for base in (tiny_llama(), tiny_llama().to(dtype)):
        lora_peft.load_peft_adapter(base, tmp_path)
        layer = base.model.layers[0].self_attn.q_proj
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        assert torch.equal(layer.lora_B, theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B[
            "default"].weight.float())


def train_a_few_steps(model, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        logits(model.train()).pow(2).mean().backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("name, targets, head", [("bert", ["query", "value"], "classifier"),
                                                 ("llama", ["embed_tokens", "q_proj", "v_proj"], "lm_head")])
def test_train_with_the_head_save_and_load_into_a_fresh_model_ours_and_peft_files_both_ways(tmp_path, name, targets,
                                                                                          head):
    peft = pytest.importorskip("peft")
    make = {"bert": tiny_bert, "llama": tiny_llama}[name]

    def fresh():  # the pretrained body (seed 0) under a new task's head drawn from another seed
        model = make()
        torch.manual_seed(5)
        for p in model.get_submodule(head).parameters():
            nn.init.normal_(p, std=0.5)
        return model
    ours = fresh()
    lora.add_lora(ours, r=4, alpha=8, targets=targets)
    lora.mark_only_lora_as_trainable(ours, modules_to_save=[head])
    train_a_few_steps(ours)
    save_file(lora.lora_state_dict(ours), tmp_path / "adapter.safetensors")
    loaded = fresh()
    lora.load_lora_state_dict(loaded, load_file(tmp_path / "adapter.safetensors"))
    assert torch.equal(logits(loaded), logits(ours))

    lora_peft.save_peft_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(in_peft), logits(ours), rtol=1e-5, atol=1e-5)
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          modules_to_save=[head]))
    train_a_few_steps(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = fresh()
    lora_peft.load_peft_adapter(in_ours, tmp_path / "theirs")
    torch.testing.assert_close(logits(in_ours), logits(theirs), rtol=1e-5, atol=1e-5)


# --- the README's loop, as written ------------------------------------------------------------------------------

def test_the_readme_use_lora_section_runs_as_written_and_its_saved_model_gives_the_adapted_logits(tmp_path,
                                                                                                 monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("torchvision")
    if not (ROOT / "README.md").exists():
        pytest.skip("no README.md beside lora.py: lora.py was copied without the repository")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use `lora.py`")[1].split("\n## ")[0]
    blocks = [b.split("```")[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 4
    monkeypatch.chdir(tmp_path)
    scope = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)
    model, ids = scope["model"].eval(), scope["ids"]
    from transformers import BertForSequenceClassification
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "finetuned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert "transformer.h.0.attn.c_attn" in [n for n, _ in lora.lora_layers(scope["gpt2"])]
    assert not isinstance(scope["gpt2"].lm_head, lora.LoRALayer)
    assert sum(isinstance(m, lora.LoRAConv) for m in scope["resnet"].modules()) == 20
    assert [n for n, _ in lora.lora_layers(scope["encoder"])] == [
        f"layers.{i}.self_attn{p}" for i in (0, 1) for p in ("", ".out_proj")]
    multi = scope["multi"]
    assert lora.adapter_names(multi) == ["sst2", "rte"] and scope["logits"].shape == (4, 2)
    assert (tmp_path / "rte.pt").exists()


# --- convolutions and PyTorch's attention, against PEFT --------------------------------------------------------

@pytest.mark.parametrize("conv", [nn.Conv1d(3, 6, 3, stride=2), nn.Conv2d(3, 6, 3, padding=1), nn.Conv3d(3, 6, 2)])
def test_our_conv_layer_matches_peft_in_output_gradients_and_merged_weight(conv):
    """Same W, A, B: the same output, gradients and merged weight as PEFT's Conv layer, in float64, with dropout."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = conv.double()
    ours = lora.LoRAConv(copy.deepcopy(base), r=2, alpha=6, dropout=0.3).train()
    nn.init.normal_(ours.lora_B)
    config = peft.LoraConfig(r=2, lora_alpha=6, lora_dropout=0.3, target_modules=["proj"])
    theirs = peft.get_peft_model(Holder(copy.deepcopy(base)), config).base_model.model.proj.train()
    pairs = [(ours.lora_A, theirs.lora_A["default"].weight), (ours.lora_B, theirs.lora_B["default"].weight)]
    with torch.no_grad():
        for mine, their in pairs:
            their.copy_(mine)
    x = torch.randn(2, 3, *[7] * (base.weight.dim() - 2), dtype=torch.float64)
    outputs = []
    for layer in (ours, theirs):
        torch.manual_seed(5)
        outputs.append(layer(x))
        outputs[-1].pow(2).sum().backward()
    assert not torch.allclose(outputs[0], base(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for mine, their in pairs:
        torch.testing.assert_close(mine.grad, their.grad, rtol=1e-12, atol=1e-12)
    ours.eval().merge()
    theirs.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-12, atol=1e-12)


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 4)).eval()


def tiny_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2).eval()


def peft_path(model, name):
    """Where PEFT keeps our layer `name`: an attention's out_proj is under its base_layer."""
    return name.removesuffix("out_proj") + "base_layer.out_proj" if lora_peft._attention_part(model, name) else name


def same_adapters_in_peft(ours, make, targets):
    """PEFT's model of the same base with our A and B."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for n, layer in lora.lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(peft_path(ours, n))
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    return theirs


def test_a_dilated_or_circular_convolution_is_refused_by_the_peft_writer_whose_format_drops_both(tmp_path):
    for conv in (nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")):
        model = nn.Sequential(conv)
        lora.add_lora(model, r=2)
        with pytest.raises(ValueError, match=r"convolutions \['0'\] are dilated or pad other than with zeros"):
            lora_peft.save_peft_adapter(model, tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()


def test_self_attn_adapters_match_peft_in_training_and_count_in_eval_where_peft_misses_them():
    """PEFT 0.21.2 added an nn.MultiheadAttention's out_proj update twice (W + 2 ΔW, huggingface/peft#3774); 0.22.0
    adds it once, as ours, so in training mode the two agree. PEFT still merges around each call, but
    nn.TransformerEncoderLayer's eval fast path reads the base weights itself, so in eval mode its adapter changes
    nothing; ours is W + ΔW in every mode."""
    ours = tiny_encoder()
    lora.add_lora(ours, r=4, alpha=8, targets=["self_attn"])
    lora.mark_only_lora_as_trainable(ours)
    perturb(ours)
    x = torch.randn(3, 5, 16)
    base_out = tiny_encoder()(x)
    theirs = same_adapters_in_peft(ours, tiny_encoder, ["self_attn"])
    train_out = ours.train()(x)
    torch.testing.assert_close(theirs.train()(x), train_out, rtol=1e-5, atol=1e-5)
    train_out.pow(2).mean().backward()
    theirs(x).pow(2).mean().backward()
    for n, layer in lora.lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(peft_path(ours, n))
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
    assert (train_out - base_out).abs().max() > 0.1
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), train_out, rtol=1e-5, atol=1e-5)  # ours: right in eval
        torch.testing.assert_close(theirs.eval()(x), base_out, rtol=1e-5, atol=1e-5)  # PEFT: the base model's
    merged, peft_merged = lora.merge_lora(ours), theirs.merge_and_unload()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, peft_merged.state_dict()[k], rtol=1e-5, atol=1e-6)


def assert_same_tensors(ours, theirs):
    """Our layers' A and B are PEFT's, bit for bit."""
    for n, layer in lora.lora_layers(ours):
        peft_layer = theirs.base_model.model.get_submodule(peft_path(ours, n))
        for ab in ("lora_A", "lora_B"):
            assert torch.equal(getattr(peft_layer, ab)["default"].weight, getattr(layer, ab)), (n, ab)


@pytest.mark.parametrize("make, targets", [(tiny_cnn, ["0", "2", "5"]), (tiny_encoder, ["self_attn", "linear1"])])
def test_conv_and_attention_adapters_move_both_ways_with_peft(tmp_path, make, targets):
    """The same tensors both ways, and PEFT's outputs where PEFT is right: in training mode (dropout 0; PEFT's
    eval misses an encoder's attention adapters, see above)."""
    peft = pytest.importorskip("peft")
    x = torch.randn(2, 3, 8, 8) if make is tiny_cnn else torch.randn(3, 5, 16)
    ours = make()
    lora.add_lora(ours, r=4, alpha=8, targets=targets)
    lora.mark_only_lora_as_trainable(ours)
    perturb(ours)
    lora_peft.save_peft_adapter(ours, tmp_path / "ours")
    in_peft = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    assert_same_tensors(ours, in_peft)
    assert not torch.allclose(ours(x), make()(x), atol=1e-3)
    torch.testing.assert_close(in_peft.train()(x), ours(x), rtol=1e-5, atol=1e-5)

    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    perturb(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = make()
    assert lora_peft.load_peft_adapter(in_ours, tmp_path / "theirs") == [n for n, _ in lora.lora_layers(ours)]
    assert trainable(in_ours) == trainable(ours)
    assert_same_tensors(in_ours, theirs)
    torch.testing.assert_close(in_ours(x), theirs.train()(x), rtol=1e-5, atol=1e-5)


# --- named adapters, PEFT's mixed batch, and PEFT's versions -------------------------------------------------------

BODY = ["body.0", "body.3"]
MIXED = ["b", None, "default", "b", None]


def move_every_adapter(model, seed=3):
    """Move every LoRA tensor of every adapter, ours or PEFT's, as training each would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)


def assert_same_adapters(ours, theirs, x):
    """Each adapter alone, and a batch mixing them with the base, give the same outputs in ours and in PEFT."""
    for name in ("default", "b"):
        lora.set_adapter(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(ours(x), theirs(x))
    with lora.adapter_per_example(ours, MIXED):
        got = ours(x)
    torch.testing.assert_close(got, theirs(x, adapter_names=[n or "__base__" for n in MIXED]))
    assert (got[0] - got[1]).abs().max() > 1e-3  # the rows differ: the adapters count


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # PEFT 0.22's load_adapter says it of its own files
def test_named_adapters_move_both_ways_with_peft_and_peft_adapter_names_batch_equals_ours(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    make = lambda: copy.deepcopy(base)  # noqa: E731
    base = Net().double().eval()
    x = torch.randn(len(MIXED), 12, dtype=torch.float64)
    ours = make()
    lora.add_lora(ours, r=4, alpha=8, targets=BODY)
    lora.add_lora(ours, r=2, alpha=3, targets=BODY, adapter="b")
    lora.mark_only_lora_as_trainable(ours)
    move_every_adapter(ours)
    lora_peft.save_peft_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "b" / "adapter_config.json").read_text())["peft_version"] == "0.22.0"
    in_peft = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    in_peft.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
    assert_same_adapters(ours, in_peft.eval(), x)

    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=BODY))
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=3, target_modules=BODY))
    move_every_adapter(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = make()
    assert lora_peft.load_peft_adapters(in_ours, tmp_path / "theirs") == {"default": BODY, "b": BODY}
    assert lora.adapter_names(in_ours) == ["default", "b"]
    assert trainable(in_ours) == {f"{n}.{k}" for n in BODY for k in ("lora_A", "lora_B")}  # the active one, as PEFT
    assert_same_adapters(in_ours, theirs.eval(), x)


@pytest.mark.parametrize("version", [None, "0.21.2", "0.17.0"])
def test_an_attention_adapter_written_before_peft_0_22_loads_with_the_outputs_its_peft_computed(tmp_path, version):
    """PEFT before 0.22 added out_proj's update twice; PEFT 0.22 doubles out_proj's B of such a file on load, with
    a warning, and so do we: the file gives the outputs its own PEFT gave, in both."""
    peft = pytest.importorskip("peft")
    ours = tiny_encoder()
    lora.add_lora(ours, r=4, alpha=8, targets=["self_attn"])
    lora.mark_only_lora_as_trainable(ours)
    perturb(ours)
    lora_peft.save_peft_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_version"] == "0.22.0"
    if version is None:
        del config["peft_version"]
    else:
        config["peft_version"] = version
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    in_ours = tiny_encoder()
    with pytest.warns(UserWarning, match=r"added the update of an nn.MultiheadAttention's out_proj twice: its "
                                         r"lora_B in \['layers.0.self_attn.out_proj', 'layers.1.self_attn.out_proj'\]"):
        lora_peft.load_peft_adapter(in_ours, tmp_path)
    for i in (0, 1):
        assert torch.equal(in_ours.layers[i].self_attn.out_proj.lora_B, 2 * ours.layers[i].self_attn.out_proj.lora_B)
        assert torch.equal(in_ours.layers[i].self_attn.lora_B, ours.layers[i].self_attn.lora_B)
    with pytest.warns(UserWarning, match="saved with PEFT < 0.22.0"):
        in_peft = peft.PeftModel.from_pretrained(tiny_encoder(), tmp_path)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(in_ours.train()(x), in_peft.train()(x), rtol=1e-5, atol=1e-5)  # PEFT: train mode

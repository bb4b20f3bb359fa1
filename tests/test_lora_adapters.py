"""lora.py's layer classes, several named adapters on one model, and a batch in which each example picks its adapter.

Every comparison is in float64, against the same model with one adapter active (or none), or against models that
carry one adapter each: exact up to float64's rounding, on any CPU. CPU, seconds.
"""

import copy

import pytest
import torch
import torch.nn as nn

import lora
import nf4


@pytest.fixture
def float64():
    """Models and inputs in float64, where the comparisons are exact up to rounding on any CPU."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class Conv1D(nn.Module):
    """transformers' Conv1D (W stored (in, out)), as tests/test_lora.py writes it."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, self.nx), self.weight).view(*x.shape[:-1], self.nf)


def perturb(model, seed=1):
    """Move every adapter tensor, as training would (B leaves zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            for a in layer.configs:
                for t in layer.adapter_tensors(a).values():
                    t.add_(torch.randn_like(t) * 0.3)


# --- each kind of layer is a class of its own ----------------------------------------------------------------------

def test_every_kind_is_wrapped_by_its_own_class_the_first_that_accepts_it():
    nf4_linear = nf4.LinearNF4.from_linear(nn.Linear(64, 8, dtype=torch.float32))
    cases = [(nn.Linear(6, 4), lora.LoRALinear, (2, 6), (4, 2)),
             (Conv1D(4, 6), lora.LoRAConv1D, (2, 6), (4, 2)),
             (nf4_linear, lora.LoRALinearNF4, (2, 64), (8, 2)),
             (nn.Embedding(10, 4), lora.LoRAEmbedding, (2, 10), (4, 2)),
             (nn.Conv2d(3, 4, 3), lora.LoRAConv, (2, 3, 3, 3), (4, 2, 1, 1)),
             (nn.MultiheadAttention(8, 2), lora.LoRAMultiheadAttention, (2, 8), (24, 2))]
    for module, cls, a_shape, b_shape in cases:
        assert lora.layer_class(module) is cls
        assert cls.shapes(module, 2) == (a_shape, b_shape)
        layer = cls(module, config=lora.LoRAConfig(r=2))
        assert type(layer) is cls and layer.lora_A.shape == a_shape and layer.lora_B.shape == b_shape
    assert lora.layer_class(nn.LayerNorm(4)) is None
    with pytest.raises(TypeError, match="wrap it with LoRAConv1D"):
        lora.LoRALinear(Conv1D(4, 6), r=2)
    with pytest.raises(TypeError, match="use_dora=True wraps nn.Linear only"):
        lora.LoRAConv1D(Conv1D(4, 6), r=2, use_dora=True)


def test_settings_are_one_frozen_object_checked_once():
    config = lora.LoRAConfig(r=4, alpha=None, use_rslora=True)
    assert (config.alpha, config.scaling) == (4.0, 2.0)
    with pytest.raises(Exception):
        config.r = 8
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        lora.LoRAConfig(r=0)
    layer = lora.LoRALinear(nn.Linear(6, 4), config=config)
    assert layer.config is config and layer.scaling == 2.0


# --- several named adapters ----------------------------------------------------------------------------------------

def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 5))


def single(config, seed):
    """A model that carries one adapter, its tensors moved as by training."""
    model = net()
    lora.add_lora(model, config=config, targets=["0", "2"])
    lora.mark_only_lora_as_trainable(model)
    perturb(model, seed)
    return model


def two_adapters():
    """(a model with adapters "default" and "b", the two single-adapter models it equals)."""
    config_a, config_b = lora.LoRAConfig(r=4, alpha=8), lora.LoRAConfig(r=2, alpha=3)
    a, b = single(config_a, 1), single(config_b, 2)
    model = net()
    lora.add_lora(model, config=config_a, targets=["0", "2"])
    lora.add_lora(model, config=config_b, targets=["0", "2"], adapter="b")
    lora.mark_only_lora_as_trainable(model)  # the active adapter, "default"
    with torch.no_grad():
        for (n, layer), src_a, src_b in zip(lora.lora_layers(model), (a[0], a[2]), (b[0], b[2])):
            for k, t in layer.adapter_tensors("default").items():
                t.copy_(getattr(src_a, k))
            for k, t in layer.adapter_tensors("b").items():
                t.copy_(getattr(src_b, k))
    return model, a, b


@pytest.mark.usefixtures("float64")
def test_a_second_adapter_is_added_inactive_and_frozen_and_set_adapter_makes_it_the_one_that_trains():
    model, a, b = two_adapters()
    assert lora.adapter_names(model) == ["default", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{k}" for i in (0, 2) for k in ("lora_A", "lora_B")}
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), a(x), rtol=0, atol=0)
    lora.set_adapter(model, "b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{i}.lora_adapters.b.{k}" for i in (0, 2) for k in ("lora_A", "lora_B")}
    torch.testing.assert_close(model(x), b(x))
    model(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    for i in (0, 2):
        for k in ("lora_A", "lora_B"):
            torch.testing.assert_close(model[i].adapter_tensors("b")[k].grad, getattr(b[i], k).grad)
            assert getattr(model[i], k).grad is None


@pytest.mark.usefixtures("float64")
def test_a_list_of_adapters_sums_their_updates_and_merges_to_the_sum():
    model, a, b = two_adapters()
    lora.set_adapter(model, ["default", "b"])
    layer = nn.Sequential(model[0])  # one layer: the sum of the updates is visible in the output
    x = torch.randn(5, 6)
    base = net()[0]
    torch.testing.assert_close(layer(x), a[0](x) + b[0](x) - base(x))
    torch.testing.assert_close(lora.merge_lora(copy.deepcopy(model))[0].weight,
                               base.weight + a[0].delta_weight() + b[0].delta_weight())


@pytest.mark.usefixtures("float64")
def test_each_adapter_has_the_state_dict_and_merge_of_its_single_adapter_model(tmp_path):
    model, a, b = two_adapters()
    for name, ref in (("default", a), ("b", b)):
        ours, theirs = lora.lora_state_dict(model, name), lora.lora_state_dict(ref)
        assert list(ours) == list(theirs)
        for k in ours:
            assert torch.equal(ours[k], theirs[k]), k
        merged, ref_merged = lora.merge_lora(copy.deepcopy(model), name), lora.merge_lora(copy.deepcopy(ref))
        for k, v in merged.state_dict().items():
            assert torch.equal(v, ref_merged.state_dict()[k]), k
    with pytest.raises(ValueError, match=r"one of the model's adapters \['default', 'b'\], got None"):
        lora.lora_state_dict(model)
    fresh = net()
    lora.load_lora_state_dict(fresh, lora.lora_state_dict(model, "default"))
    lora.load_lora_state_dict(fresh, lora.lora_state_dict(model, "b"), adapter="b")
    x = torch.randn(4, 6)
    for name, ref in (("default", a), ("b", b)):
        lora.set_adapter(fresh, name)
        torch.testing.assert_close(fresh(x), ref(x))
    assert set(model.state_dict()) == set(fresh.state_dict())


@pytest.mark.usefixtures("float64")
def test_delete_adapter_leaves_the_other_and_the_last_one_gives_back_the_base_module():
    model, a, b = two_adapters()
    lora.delete_adapter(model, "default")
    lora.set_adapter(model, "b")
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), b(x))
    lora.delete_adapter(model, "b")
    assert type(model[0]) is nn.Linear and not list(lora.lora_layers(model))
    torch.testing.assert_close(model(x), net()(x), rtol=0, atol=0)


def test_named_adapters_refuse_what_they_would_get_wrong():
    model, _, _ = two_adapters()
    with pytest.raises(ValueError, match="already carries LoRA"):
        lora.add_lora(model, r=2, targets="0", adapter="b")
    with pytest.raises(ValueError, match=r"adapter must be one of the model's adapters \['default', 'b'\]"):
        lora.set_adapter(model, "c")
    with pytest.raises(ValueError, match="adapter must be a name that is a Python identifier"):
        lora.add_lora(model, r=2, targets="0", adapter="a.b")
    lora.add_lora(model, r=2, targets="0", adapter="d", use_dora=True)
    with pytest.raises(ValueError, match=r"adapters \['d'\] use DoRA.*cannot be summed"):
        lora.set_adapter(model, ["b", "d"])


# --- a batch in which each example picks its adapter --------------------------------------------------------------

def tiny_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).double()


def tiny_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0)  # (S, N, E): the batch is dim 1
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()


NAMES = ["b", None, "default", "c", "b", None, "default"]  # three adapters and the base, in any order


def mixed_models():
    """(make, targets, input of 7 examples, batch_dim, output of a call), for a BERT and a PyTorch encoder."""
    torch.manual_seed(3)
    ids = torch.randint(0, 40, (7, 5))
    x = torch.randn(5, 7, 16)
    return [(tiny_bert, ["query", "value", "word_embeddings", "intermediate.dense"], ids, 0,
             lambda m, t: m(input_ids=t).last_hidden_state),
            (tiny_encoder, ["self_attn", "linear1"], x, 1, lambda m, t: m(t))]


def with_three_adapters(make, targets):
    model = make()
    lora.add_lora(model, r=4, alpha=8, targets=targets)
    lora.add_lora(model, r=2, alpha=2, targets=targets, adapter="b")
    lora.add_lora(model, r=3, alpha=6, targets=targets[:1], adapter="c")  # "c" on fewer layers
    perturb(model)
    lora.mark_only_lora_as_trainable(model, adapters=["default", "b", "c"])
    return model


def reference(model, call, x, dim, names):
    """Row by row: the model with only that example's adapter active (or none), and each adapter's gradient from
    its own rows alone."""
    out, grads = [None] * len(names), {}
    for name in dict.fromkeys(names):
        rows = torch.tensor([i for i, n in enumerate(names) if n == name])
        ref = copy.deepcopy(model)
        if name is None:
            with lora.disable_lora(ref):
                got = call(ref, x.index_select(dim, rows))
        else:
            lora.set_adapter(ref, name)
            got = call(ref, x.index_select(dim, rows))
            got.pow(2).sum().backward()
            grads[name] = {f"{n}.{k}": t.grad for n, layer in lora.lora_layers(ref) if name in layer.configs
                           for k, t in layer.adapter_tensors(name).items()}
        for j, i in enumerate(rows.tolist()):
            out[i] = got.select(dim, j)
    return torch.stack(out, dim), grads


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("case", [0, 1], ids=["bert", "transformer_encoder"])
def test_a_mixed_batch_gives_each_example_its_adapters_output_and_each_adapter_its_own_gradient(case, stacked,
                                                                                              monkeypatch):
    if case == 0:
        pytest.importorskip("transformers")
    make, targets, x, dim, call = mixed_models()[case]
    if not stacked:
        monkeypatch.setattr(lora, "STACK_MAX_RANK", 0)  # every adapter a sub-batch
    model = with_three_adapters(make, targets)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        want, grads = reference(model, call, x, dim, NAMES)
        model.zero_grad()
        with lora.adapter_per_example(model, NAMES, batch_dim=dim):
            got = call(model, x)
        torch.testing.assert_close(got, want)
        got.pow(2).sum().backward()
        for name, ref in grads.items():
            for key, g in ref.items():
                path, _, k = key.rpartition(".")
                torch.testing.assert_close(model.get_submodule(path).adapter_tensors(name)[k].grad, g)
    with lora.disable_lora(model):
        base = call(model, x)
    with lora.adapter_per_example(model, [None] * 7, batch_dim=dim):
        torch.testing.assert_close(call(model, x), base, rtol=0, atol=0)


def test_adapter_per_example_refuses_unknown_names_a_wrong_batch_dim_and_dora():
    model, _, _ = two_adapters()
    with pytest.raises(ValueError, match=r"the model's adapters are \['default', 'b'\], got \['z'\]"):
        with lora.adapter_per_example(model, ["z"]):
            pass
    with pytest.raises(ValueError, match="given 3 names, but .* has 4 along batch_dim=0"):
        with lora.adapter_per_example(model, ["b", None, "b"]):
            model(torch.randn(4, 6))
    assert all(layer.per_example is None for _, layer in lora.lora_layers(model))
    lora.add_lora(model, r=2, targets="0", adapter="d", use_dora=True)
    with pytest.raises(ValueError, match=r"adapters \['d'\] use DoRA"):
        with lora.adapter_per_example(model, ["d", "b"]):
            pass

"""LoRA on transformers: the paper's RoBERTa-base count, and the row transformer of the MNIST experiment."""

import dataclasses
import warnings

import pytest
import torch

import lora
from experiments import storage
from experiments.methods import Method
from experiments.mnist.config import Config
from experiments.mnist.experiment import MnistExperiment
from experiments.mnist.models import add_adapter
from experiments.mnist.row_transformer import TARGET_SETS, RowTransformer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def roberta():
    """RoBERTa-base's architecture with random weights (nothing is downloaded), Wq and Wv adapted at r=8."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig()).eval()
    ids = torch.randint(5, 1000, (2, 12))
    base_logits = model(input_ids=ids).logits
    wrapped = lora.add_lora(model, r=8, targets=["query", "value"])
    lora.mark_only_lora_as_trainable(model)
    return model, wrapped, ids, base_logits


def test_roberta_base_lora_on_wq_wv_at_r8_trains_the_papers_294912_parameters(roberta):
    model, wrapped, _, _ = roberta
    assert len(wrapped) == 24 and all(n.endswith(("attention.self.query", "attention.self.value")) for n in wrapped)
    trainable, total = lora.count_parameters(model)
    assert trainable == 2 * 12 * 8 * (768 + 768) == 294_912  # Hu et al. 2021, Table 2: "0.3M"
    assert total - trainable == 124_646_402  # the base model: 125M in the paper's Table 2
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    assert head == 768 * 768 + 768 + 768 * 2 + 2 == 592_130  # what training the new classifier head adds


def test_roberta_forward_backward_touches_only_the_adapters_and_merging_keeps_the_logits(roberta):
    model, _, ids, base_logits = roberta
    assert torch.equal(model(input_ids=ids).logits, base_logits)  # B = 0: the base model exactly
    model.train()
    for p in model.parameters():
        p.grad = None
    torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert len(with_grad) == 48
    model.eval()
    for _, layer in lora.lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.02)
    adapted = model(input_ids=ids).logits
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_row_transformer_has_separate_q_k_v_o_and_the_expected_parameter_counts():
    model = RowTransformer()
    assert lora.count_parameters(model) == (19_141, 19_141)
    assert lora.add_lora(RowTransformer(), r=2, targets=TARGET_SETS["qv"]) == [
        "blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    d, layers, d_mlp, head = 32, 2, 64, 32 * 5 + 5
    per_rank = {"qv": layers * 2 * (d + d), "qkvo": layers * 4 * (d + d),
                "all": layers * (4 * (d + d) + (d + d_mlp) + (d_mlp + d)) + (28 + d)}  # every Linear but the head
    for name in TARGET_SETS:
        for r in (1, 8):
            model = RowTransformer()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the head is never wrapped, so r = 8 > 5 warns nowhere
                add_adapter(model, Method("lora", r, name))
            assert lora.count_parameters(model)[0] == per_rank[name] * r + head, (name, r)
            assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n} == {
                "head.weight", "head.bias"}  # the classifier head trains in full, as in the paper


def test_row_transformer_with_lora_starts_at_the_base_and_merges_exactly():
    torch.manual_seed(0)
    model = RowTransformer().eval()
    x = torch.randn(6, 784)
    base = model(x)
    lora.add_lora(model, r=4, targets=TARGET_SETS["qkvo"])
    assert torch.equal(model(x), base)
    for _, layer in lora.lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    adapted = model(x)
    with lora.disable_lora(model):
        assert torch.equal(model(x), base)
    lora.merge_lora(model)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


def test_the_transformer_config_refuses_target_sets_of_another_model():
    with pytest.raises(ValueError, match="target_sets for the mlp"):
        dataclasses.replace(Config(), target_sets=("qv",))
    with pytest.raises(ValueError, match="model must be"):
        dataclasses.replace(Config(), model="cnn")


def test_the_transformer_pipeline_runs_on_the_quick_config(tmp_path, run_pipeline):
    out = storage.Outputs("transformer", tmp_path)
    _, _, per_seed, results = run_pipeline(MnistExperiment(Config.quick("transformer"), CPU), out)
    assert list(results.method) == ["full", "lora_qv_r2", "lora_qkvo_r2", "lora_all_r2"]
    assert list(results.trainable_params) == [19_141, 2 * 256 + 165, 2 * 512 + 165, 2 * 956 + 165]
    assert (per_seed.loss_last_epoch < per_seed.loss_first_epoch).all()
    assert per_seed.acc_A_disabled.isna().all()  # the head trained too: switching LoRA off is not the base model
    for path in out.all():
        assert path.stat().st_size > 0 and path.parent == tmp_path / "results", path
    assert not any(p.exists() for p in storage.Outputs("mlp", tmp_path).all())  # the MLP's files are left alone

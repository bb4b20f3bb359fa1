"""The MLP's written-out stacked forward (experiments/mnist/stacked_mlp.py) against vmap over lora.py's own
layers (trainer.forward): the same logits and the same gradients, for full finetuning, LoRA and DoRA."""

import pytest
import torch

import lora
from experiments.mnist import stacked_mlp
from experiments.mnist.models import make_mlp
from experiments.trainer import forward, stack

L, G, B = 3, 2, 16  # learning rates, seeds, batch


def stacked_models(kind: str):
    """(template model, params (L * G, ...) per model, frozen (G, ...) per seed, scaling) with adapters that
    are not at their zero start, so that every term of the forward counts."""
    models = []
    for g in range(G):
        torch.manual_seed(g)
        models.append(make_mlp(dropout=0.1))
        if kind != "full":
            lora.add_lora(models[-1], r=2, alpha=4, use_dora=kind == "dora")
            lora.mark_only_lora_as_trainable(models[-1])
    template = models[0]
    states = stack([dict(m.named_parameters()) for m in models])  # (G, ...)
    params, frozen = {}, {}
    for name, p in template.named_parameters():
        if p.requires_grad:  # a different value per learning rate, as after some training
            params[name] = (states[name].detach().repeat(L, *[1] * p.dim())
                            + 0.1 * torch.randn(L * G, *p.shape)).requires_grad_()
        else:
            frozen[name] = states[name].detach()
    scaling = next(layer.scaling for _, layer in lora.lora_layers(template)) if kind != "full" else 1.0
    return template, params, frozen, scaling


@pytest.mark.parametrize("kind", ["full", "lora", "dora"])
def test_the_written_out_forward_gives_the_logits_and_gradients_of_vmap_over_lora_py(kind):
    torch.manual_seed(0)
    template, params, frozen, scaling = stacked_models(kind)
    x = torch.randn(G if frozen else L * G, B, 784)
    template.eval()  # dropout off in both: their random streams differ
    ours = stacked_mlp.forward(params, frozen, x, scaling, dropout=0.1, training=False)
    theirs = forward(template, params, x, frozen)
    assert ours.shape == theirs.shape == (L * G, B, 5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ours)
    grads_ours = torch.autograd.grad((ours * g).sum(), list(params.values()))
    grads_theirs = torch.autograd.grad((theirs * g).sum(), list(params.values()))
    for name, a, b in zip(params, grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_dropout_draws_fresh_masks_in_training_and_keeps_the_mean():
    torch.manual_seed(0)
    _, params, frozen, scaling = stacked_models("lora")
    x = torch.randn(G, 512, 784)
    run = lambda p, training: stacked_mlp.forward(params, frozen, x, scaling, dropout=p, training=training)
    torch.testing.assert_close(run(0.0, True), run(0.1, False))  # p = 0, or eval mode: no dropout
    a, b, c = run(0.1, True), run(0.1, True), run(0.1, False)
    assert not torch.equal(a, b)  # fresh masks each step
    assert (a.mean() - c.mean()).abs() < 0.05 * c.abs().mean()  # inverted dropout keeps the expectation

"""The stacked trainer (trainer.py) against the plain loop (plain_loop.py): same weights after training."""

import copy

import pytest
import torch

import lora
from models import make_mlp
from plain_loop import plain_fit
from trainer import fit, stack


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 784, generator=g)
    y = torch.randint(0, 5, (320,), generator=g)
    return x, y


def assert_same_weights(stacked: torch.Tensor, alone: torch.Tensor) -> None:
    """Equal up to float32 rounding: the two loops sum in different orders, and Adam's division by sqrt(v)
    magnifies that in coordinates whose gradient is nearly zero, so the bound is on the whole tensor."""
    err = (stacked.detach() - alone.detach()).norm() / alone.detach().norm()
    assert err < 1e-4, f"relative error {err:.2e}"  # measured up to 1.1e-5; a wrong data order gives ~1


def train_both(models: list[torch.nn.Module], seeds: list[int], x, y, lr: float):
    """Each model trained alone by the plain loop, and all of them stacked by trainer.fit, from the same start."""
    alone = [copy.deepcopy(m) for m in models]
    losses_alone = [plain_fit(m, x, y, s, lr, epochs=2, batch_size=32) for m, s in zip(alone, seeds)]
    params = {k: v.detach().clone() for k, v in stack([dict(m.named_parameters()) for m in models]).items()}
    for name, p in models[0].named_parameters():
        params[name].requires_grad_(p.requires_grad)
    losses_stacked = fit(models[0], params, (x, y), seeds, lr, epochs=2, batch_size=32)
    return alone, losses_alone, params, losses_stacked


def test_stacked_full_training_gives_the_weights_of_separate_plain_loops(data):
    seeds = [0, 1, 2]
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(make_mlp(dropout=0.0))  # dropout off: the random streams of the two loops differ
    alone, losses_alone, params, losses_stacked = train_both(models, seeds, *data, lr=1e-3)
    for i, m in enumerate(alone):
        for name, p in m.named_parameters():
            assert_same_weights(params[name][i], p)
    mean_alone = [sum(ls[e] for ls in losses_alone) / len(seeds) for e in range(2)]
    assert losses_stacked == pytest.approx(mean_alone, rel=1e-5)
    assert not torch.equal(params["0.weight"][0], models[0][0].weight)  # it trained


def test_stacked_lora_training_moves_only_the_adapters_like_separate_plain_loops(data):
    seeds = [3, 4]
    torch.manual_seed(0)
    base = make_mlp(dropout=0.0)
    models = []
    for s in seeds:
        torch.manual_seed(s)
        m = copy.deepcopy(base)
        lora.add_lora(m, r=2)
        lora.mark_only_lora_as_trainable(m)
        models.append(m)
    alone, _, params, _ = train_both(models, seeds, *data, lr=1e-2)
    for i, m in enumerate(alone):
        for name, p in m.named_parameters():
            assert_same_weights(params[name][i], p)
            if not name.endswith(("lora_A", "lora_B")):
                assert torch.equal(params[name][i], base.get_parameter(name))  # frozen: bit for bit
    assert params["0.lora_B"].abs().sum() > 0  # the adapters trained

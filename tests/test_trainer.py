"""The stacked trainer (experiments/trainer.py) against the plain loop (experiments/plain_loop.py): same weights
after training."""

import copy
import math

import pytest
import torch

import lora
from experiments.mnist.models import make_mlp
from experiments.plain_loop import plain_fit
from experiments.trainer import CosineAdam, fit, lr_factor, stack, warmup_steps


@pytest.fixture(scope="module")
def data():
    """In float64, where the stacked and plain loops are compared: the two sum in different orders, and Adam's
    division by sqrt(v) magnifies float32's rounding of that in coordinates whose gradient is nearly zero, by an
    amount that differs between CPUs (1.1e-5 relative on an AMD EPYC, 6.9e-4 on an Intel Xeon). In float64 the
    same rounding is 1e-16 and the loops must agree to far below any real difference."""
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(320, 784, generator=g, dtype=torch.float64)  # gradients above MAX_GRAD_NORM: clipped
    y = torch.randint(0, 5, (320,), generator=g)
    return x, y


def make_mlp64(**kwargs) -> torch.nn.Module:
    return make_mlp(**kwargs).double()


def assert_same_weights(stacked: torch.Tensor, alone: torch.Tensor, bound: float = 1e-9) -> None:
    """Equal up to rounding: a relative error on the whole tensor (float64 here; a wrong data order, learning rate
    or clipping gives ~1e-2 to 1)."""
    err = (stacked.detach() - alone.detach()).norm() / alone.detach().norm()
    assert err < bound, f"relative error {err:.2e}"


def epoch_means(step_losses: list[float], epochs: int = 2) -> list[float]:
    n = len(step_losses) // epochs
    return [sum(step_losses[e * n:(e + 1) * n]) / n for e in range(epochs)]


def train_both(models: list[torch.nn.Module], seeds: list[int], x, y, lr: float):
    """Each model trained alone by the plain loop, and all of them stacked by trainer.fit, from the same start."""
    alone = [copy.deepcopy(m) for m in models]
    losses_alone = [epoch_means(plain_fit(m, x, y, s, lr, epochs=2, batch_size=32)) for m, s in zip(alone, seeds)]
    params = {k: v.detach().clone() for k, v in stack([dict(m.named_parameters()) for m in models]).items()}
    for name, p in models[0].named_parameters():
        params[name].requires_grad_(p.requires_grad)
    losses_stacked = fit(models[0], params, (x, y), seeds, [lr] * len(seeds), epochs=2, batch_size=32)
    return alone, losses_alone, params, losses_stacked


def test_stacked_full_training_gives_the_weights_of_separate_plain_loops(data):
    seeds = [0, 1, 2]
    models = []
    for s in seeds:
        torch.manual_seed(s)
        models.append(make_mlp64(dropout=0.0))  # dropout off: the random streams of the two loops differ
    alone, losses_alone, params, losses_stacked = train_both(models, seeds, *data, lr=1e-3)
    for i, m in enumerate(alone):
        for name, p in m.named_parameters():
            assert_same_weights(params[name][i], p)
    for stacked, alone_losses in zip(losses_stacked, losses_alone):
        assert stacked == pytest.approx(alone_losses, rel=1e-5)
    assert not torch.equal(params["0.weight"][0], models[0][0].weight)  # it trained


def test_stacked_lora_training_moves_only_the_adapters_like_separate_plain_loops(data):
    seeds = [3, 4]
    torch.manual_seed(0)
    base = make_mlp64(dropout=0.0)
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


def test_stacked_learning_rates_give_the_weights_of_separate_plain_loops(data):
    torch.manual_seed(0)
    model = make_mlp64(dropout=0.0)
    lrs = [1e-4, 1e-3, 1e-2]
    alone, losses_alone = [], []
    for lr in lrs:
        m = copy.deepcopy(model)
        losses_alone.append(epoch_means(plain_fit(m, *data, seed=7, lr=lr, epochs=2, batch_size=32)))
        alone.append(m)
    params = {k: v.detach().clone().requires_grad_() for k, v in stack([dict(model.named_parameters())] * 3).items()}
    losses = fit(model, params, data, [7] * 3, lrs, epochs=2, batch_size=32)
    for i, m in enumerate(alone):
        assert losses[i] == pytest.approx(losses_alone[i], rel=1e-5)
        for name, p in m.named_parameters():
            assert_same_weights(params[name][i], p)
    assert not torch.allclose(params["0.weight"][0], params["0.weight"][2])  # the learning rates made a difference


def test_clipping_is_on_where_the_stacked_and_plain_loops_are_compared(data):
    """The comparisons above run through the clipping branch: the MLP's first gradient is above MAX_GRAD_NORM."""
    torch.manual_seed(0)
    model = make_mlp64(dropout=0.0)
    x, y = data
    torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")) > 1.0


def test_the_schedule_warms_up_linearly_over_6_percent_then_follows_a_cosine_to_zero():
    total = 1000
    assert warmup_steps(total) == 60 and warmup_steps(10) == 1
    assert [lr_factor(t, total) for t in (0, 29, 59)] == pytest.approx([1 / 60, 0.5, 1.0])
    assert lr_factor(60, total) == 1.0
    assert lr_factor(60 + 470, total) == pytest.approx(0.5)  # half way through the 940 cosine steps
    assert lr_factor(999, total) == pytest.approx((1 + math.cos(math.pi * 939 / 940)) / 2)


def test_each_stacked_model_steps_at_its_own_lr_times_the_schedule():
    """With a constant gradient Adam's bias-corrected m / sqrt(v) is exactly 1, so every step moves a weight by
    the learning rate of that step: lr * lr_factor(t), for each model at its own lr."""
    lrs, total = [1e-2, 3e-1], 50
    p = torch.zeros(2, 3)
    opt = CosineAdam([p], lrs, total_steps=total, eps=0.0)
    for t in range(total):
        p.zero_()  # from zero, so that the step is read without cancellation
        opt.step([torch.full((2, 3), 1e-3)])  # far below the clipping norm
        moved = -p[:, 0]
        assert moved.tolist() == pytest.approx([lr * lr_factor(t, total) for lr in lrs], rel=1e-5)


def test_each_stacked_model_is_clipped_by_its_own_gradient_norm_as_clip_grad_norm_does():
    g = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    h = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    g[0] *= 100  # model 0 far above the norm 1.0, model 1 at about 10, model 2 below
    g[2] *= 1e-3
    h[2] *= 1e-3
    clipped = CosineAdam([g, h], [1.0] * 3, total_steps=1).clip([g, h])
    for s in range(3):
        alone = [g[s].clone(), h[s].clone()]
        params = [torch.zeros_like(t, requires_grad=True) for t in alone]
        for q, a in zip(params, alone):
            q.grad = a
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        assert torch.allclose(clipped[0][s], params[0].grad, rtol=1e-6, atol=0)
        assert torch.allclose(clipped[1][s], params[1].grad, rtol=1e-6, atol=0)
    assert torch.equal(clipped[0][2], g[2])  # below the norm: untouched
    assert torch.linalg.vector_norm(torch.cat([clipped[0][0].flatten(), clipped[1][0]])) == pytest.approx(1.0, rel=1e-5)


def test_fit_refuses_a_learning_rate_count_that_is_not_the_model_count(data):
    params = {k: v.detach().clone().requires_grad_() for k, v in stack([dict(make_mlp64().named_parameters())] * 2).items()}
    with pytest.raises(ValueError, match="2 seeds but 3 learning rates"):
        fit(make_mlp64(), params, data, [0, 1], [1e-3] * 3, epochs=1, batch_size=32)


def test_a_step_that_cannot_be_captured_in_a_cuda_graph_runs_eagerly_with_one_warning(data):
    """On the CPU no graph can be captured: asking for one must warn once and train exactly as without."""
    torch.manual_seed(0)
    model = make_mlp64(dropout=0.0)
    start = {k: v.detach().clone().requires_grad_() for k, v in stack([dict(model.named_parameters())] * 2).items()}
    eager = {k: v.detach().clone().requires_grad_() for k, v in start.items()}
    losses_eager = fit(model, eager, data, [0, 1], [1e-3] * 2, epochs=2, batch_size=32, graph=False)
    with pytest.warns(RuntimeWarning, match="not captured in a CUDA graph") as caught:
        losses = fit(model, start, data, [0, 1], [1e-3] * 2, epochs=2, batch_size=32, graph=True)
    assert len([w for w in caught if "CUDA graph" in str(w.message)]) == 1
    assert losses == losses_eager
    for k in start:
        assert torch.equal(start[k], eager[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_graph_step_trains_like_the_eager_step(data):
    torch.manual_seed(0)
    model = make_mlp64(dropout=0.0).cuda()
    x, y = (t.cuda() for t in data)
    start = {k: v.detach().clone().requires_grad_() for k, v in stack([dict(model.named_parameters())] * 2).items()}
    eager = {k: v.detach().clone().requires_grad_() for k, v in start.items()}
    losses_eager = fit(model, eager, (x, y), [0, 1], [1e-3, 1e-2], epochs=2, batch_size=32, graph=False)
    losses = fit(model, start, (x, y), [0, 1], [1e-3, 1e-2], epochs=2, batch_size=32, graph=True)
    for graphed, eagerly in zip(losses, losses_eager):
        assert graphed == pytest.approx(eagerly, rel=1e-5)
    for k in start:
        assert_same_weights(start[k], eager[k])

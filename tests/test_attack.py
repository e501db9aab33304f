"""The PGD engine's invariants and known answers, and the objectives against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from utils.attack import ce_loss_fn, eval_mode, kl_divergence, pgd_attack, trades_kl_loss_fn
from utils.steps import StepConfig
from utils.losses import pgd_at_objective, robust_loss, trades_objective
from conftest import seeded


def tiny_model(dtype=torch.float64):
    torch.manual_seed(seeded(0))
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(16, 5)).to(dtype)


def batch(n=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seeded(1))
    return torch.rand(n, 3, 4, 4, generator=g, dtype=dtype), torch.arange(n) % 5


def test_eval_mode_restores_every_submodule_flag():
    model = tiny_model()
    model.train()
    model[2].eval()  # mixed modes must come back exactly
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def test_attack_leaves_mode_and_parameter_grads_untouched():
    model = tiny_model()
    model.train()
    model[1].weight.grad = torch.full_like(model[1].weight, 0.25)
    x, y = batch()
    pgd_attack(model, x, ce_loss_fn(y), eps=0.1, step_size=0.02, num_steps=3)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].weight.grad, torch.full_like(model[1].weight, 0.25))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "1.weight")


@settings(max_examples=30, deadline=None)
@given(eps=st.floats(0, 0.5), step=st.floats(0, 0.3), steps=st.integers(0, 4),
       start=st.sampled_from(["uniform", "normal", "none"]), seed=st.integers(0, 2**16))
def test_adversarial_examples_stay_in_the_eps_ball_and_in_pixel_range(eps, step, steps, start, seed):
    model = tiny_model()
    g = torch.Generator().manual_seed(seeded(seed))
    x = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64)
    x[0] = 0.0  # images at the borders of [0,1]
    x[1] = 1.0
    y = torch.arange(4)
    x_adv = pgd_attack(model, x, ce_loss_fn(y), eps=eps, step_size=step, num_steps=steps, random_start=start)
    assert (x_adv - x).abs().max() <= eps + 1e-12
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_one_step_without_random_start_is_the_hand_computed_signed_gradient_step():
    torch.manual_seed(seeded(0))
    lin = nn.Linear(12, 3).double()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(2, 3, 2, 2, dtype=torch.float64) * 0.5 + 0.25
    y = torch.tensor([0, 2])
    # d CE / d x for a linear model: W^T (softmax(Wx + b) - onehot(y))
    p = torch.softmax(x.flatten(1) @ lin.weight.T + lin.bias, 1)
    grad = ((p - F.one_hot(y, 3).double()) @ lin.weight).view_as(x)
    expected = (x + 0.05 * grad.sign()).clamp(x - 0.1, x + 0.1).clamp(0, 1)
    x_adv = pgd_attack(model, x, ce_loss_fn(y), eps=0.1, step_size=0.05, num_steps=1, random_start="none")
    assert torch.allclose(x_adv, expected)


def test_attack_increases_the_loss():
    """On a linear model the cross-entropy is convex in x: CE(x') >= CE(x) + grad . (x' - x), and a signed gradient
    step clipped to the eps-ball and [0,1] never moves against the gradient, so every PGD step raises the loss (the
    first, from the centre of the ball, by at least step * |grad|_1 > 0). What holds for any weights, unlike "the
    loss went up" on a network."""
    torch.manual_seed(seeded(0))
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5)).double().eval()
    x, y = batch()
    x = 0.25 + 0.5 * x  # inside (0, 1): the first step is not clipped by the pixel range
    losses = []
    for k in range(5):
        x_adv = pgd_attack(model, x, ce_loss_fn(y), eps=0.2, step_size=0.05, num_steps=k, random_start="none")
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x_adv), y).item())
    assert losses[1] > losses[0] and all(b >= a for a, b in zip(losses, losses[1:])), losses


def test_bad_attack_parameters_are_refused():
    model, (x, y) = tiny_model(), batch()
    for kw in (dict(eps=-0.1, step_size=0.1, num_steps=1), dict(eps=0.1, step_size=0.1, num_steps=-1)):
        with pytest.raises(ValueError):
            pgd_attack(model, x, ce_loss_fn(y), **kw)


def test_kl_is_finite_with_gradient_when_a_probability_underflows_to_zero():
    # float32 softmax of these logits has exact zeros: the reference's xlogy form gave NaN gradients here.
    p_logits = torch.tensor([[0.0, -200.0, 10.0]])
    assert torch.softmax(p_logits, 1).min() == 0
    q_logits = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    kl = kl_divergence(p_logits, q_logits)
    kl.backward()
    assert torch.isfinite(kl) and torch.isfinite(q_logits.grad).all()
    with torch.no_grad():
        assert math.isfinite(trades_kl_loss_fn(p_logits)(lambda z: z * 0 + q_logits, torch.zeros(1, 3)).item())


def _hand_kl(p_logits, q_logits):
    total = 0.0
    for pr, qr in zip(p_logits.tolist(), q_logits.tolist()):
        zp, zq = sum(math.exp(v) for v in pr), sum(math.exp(v) for v in qr)
        total += sum(math.exp(a) / zp * (math.log(math.exp(a) / zp) - math.log(math.exp(b) / zq))
                     for a, b in zip(pr, qr))
    return total


def _hand_ce(logits, y):
    rows = logits.tolist()
    return sum(math.log(sum(math.exp(v) for v in r)) - r[t] for r, t in zip(rows, y.tolist())) / len(rows)


def test_trades_and_pgd_at_objectives_equal_hand_computed_values():
    g = torch.Generator().manual_seed(seeded(3))
    clean, adv = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g,
                                                                                   dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    out = trades_objective(clean, adv, y, beta=6.0)
    assert out["loss_natural"].item() == pytest.approx(_hand_ce(clean, y), rel=1e-6)
    assert out["loss_robust"].item() == pytest.approx(_hand_kl(clean, adv) / 4, rel=1e-6)
    assert out["loss"].item() == pytest.approx(_hand_ce(clean, y) + 6.0 * _hand_kl(clean, adv) / 4, rel=1e-6)
    assert pgd_at_objective(adv, y)["loss"].item() == pytest.approx(_hand_ce(adv, y), rel=1e-6)


class CountingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_model()
        self.calls = {"train": 0, "eval": 0}

    def forward(self, x):
        self.calls["train" if self.training else "eval"] += 1
        return self.net(x)


@pytest.mark.parametrize("at,train_forwards,eval_forwards", [("trades", 2, 1 + 3), ("pgd", 1, 3)])
def test_robust_loss_forward_counts(at, train_forwards, eval_forwards):
    model = CountingModel().train()
    x, y = batch()
    out = robust_loss(model, x, y, StepConfig(at=at, eps=0.1, step_size=0.03, num_steps=3, beta=6.0))
    assert model.calls == {"train": train_forwards, "eval": eval_forwards}
    assert model.training and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert (out["x_adv"] - x).abs().max() <= 0.1 + 1e-12
    with pytest.raises(ValueError):
        robust_loss(model, x, y, StepConfig(at="fgsm", eps=0.1, step_size=0.03, num_steps=1, beta=6.0))

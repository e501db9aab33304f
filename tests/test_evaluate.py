"""MoE evaluation: RA is the per-image worst case of the straight-through, the fixed-routing and the routing attack;
the router's BatchNorm statistics follow its weights."""
import types

import pytest
import torch

import models
from utils import balance, evaluate as ev
from utils.attack import ce_loss_fn, pgd_attack
from utils.runtime import eval_start_seed
from conftest import seeded

EPS, STEP, STEPS = 8 / 255, 2 / 255, 3
SEED = seeded(5)  # the evaluation's seed


def _model(seed=0):
    torch.manual_seed(seeded(seed))
    return models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=2).eval()


def _batch(model, b=32):
    g = torch.Generator().manual_seed(seeded(1))
    x = torch.rand(b, 3, 32, 32, generator=g)
    with torch.no_grad():
        return x, model(x).argmax(1)  # labels = clean predictions: SA 100%, RA counts what the attacks flip


def _evaluate(model, x, y):
    return ev.evaluate(model, [(x, y)], ev.EvalConfig(EPS, STEP, STEPS, seed=SEED, progress=False), "cpu")


def _by_hand(model, x, y, ste_loss_fn):
    """The three attacks in evaluate's order, from the same random-start generator; each judged by the whole MoE."""
    g = torch.Generator().manual_seed(eval_start_seed(SEED, 0))
    attack = dict(eps=EPS, step_size=STEP, num_steps=STEPS, random_start="uniform", generator=g)
    x_ste = pgd_attack(model, x, ste_loss_fn(y), **attack)
    with torch.no_grad():
        clean_expert = model.route(x).argmax(1)
    x_fix = pgd_attack(model, x, ev.fixed_routing_ce_fn(y, clean_expert), **attack)
    x_route = pgd_attack(model, x, ev.router_decision_loss_fn(clean_expert), **attack)
    with torch.no_grad():
        return model(x_ste).argmax(1) == y, model(x_fix).argmax(1) == y, model(x_route).argmax(1) == y


@pytest.mark.slow
def test_moe_ra_is_the_per_image_worst_case_of_the_three_attacks():
    model = _model()
    x, y = _batch(model)
    out = _evaluate(model, x, y)
    ste, fix, route = _by_hand(model, x, y, ce_loss_fn)
    assert out["sa"] == 100.0
    assert out["ra_ste"] == 100 * ste.float().mean().item()
    assert out["ra_routing_attack"] == 100 * route.float().mean().item()
    assert out["ra"] == 100 * (ste & fix & route).float().mean().item()
    assert out["ra"] <= min(out["ra_ste"], out["ra_routing_attack"])


@pytest.mark.slow
def test_a_useless_straight_through_gradient_cannot_hide_the_experts(monkeypatch):
    """A router whose gradient tells the attack nothing (here: the straight-through attack's gradient is zero, so
    it only takes its random start) leaves RA to the fixed-routing attack: the same by-hand count. (How much each
    attack flips is what the untrained model happens to give; the stub below fixes it.)"""
    def masked(y):
        return lambda model, x_adv: (model(x_adv) * 0.0).sum()
    monkeypatch.setattr(ev, "ce_loss_fn", masked)
    model = _model()
    x, y = _batch(model)
    out = _evaluate(model, x, y)
    ste, fix, route = _by_hand(model, x, y, masked)
    assert out["ra_ste"] == 100 * ste.float().mean().item()
    assert out["ra"] == 100 * (ste & fix & route).float().mean().item() <= out["ra_ste"]


class _Stub(torch.nn.Module):
    """A 2-expert "MoE" that predicts the class written in pixel (0, 0, 0) (as class / 10): its answers are known."""
    is_moe, n_expert = True, 2

    def forward(self, x, return_routing=False, expert=None, gate=None):
        logits = torch.nn.functional.one_hot((x[:, 0, 0, 0] * 10).round().long(), 10).float()
        info = types.SimpleNamespace(expert=torch.zeros(len(x), dtype=torch.long), gate=None)
        return (logits, info) if return_routing else logits


@pytest.mark.parametrize("ste_flips,fix_flips,route_flips", [({0, 1, 2}, {2, 3, 4}, {4, 6}), (set(), {1, 5}, set()),
                                                              ({3}, set(), set()), (set(), set(), {7})],
                         ids=["all", "useless-straight-through", "useless-fixed", "routing-only"])
def test_ra_counts_an_image_robust_only_if_every_attack_leaves_it(monkeypatch, ste_flips, fix_flips, route_flips):
    """Attacks that flip known images (the stub's class pixel moved): RA = images that no attack flipped,
    RA(straight-through) and RA under the routing attack = images that attack left."""
    def attack(model, x, loss_fn, **kw):
        x_adv = x.clone()
        for i in {"ste": ste_flips, "fix": fix_flips, "route": route_flips}[loss_fn]:
            x_adv[i, 0, 0, 0] = (x_adv[i, 0, 0, 0] + 0.1) % 1.0  # another class
        return x_adv
    monkeypatch.setattr(ev, "pgd_attack", attack)
    monkeypatch.setattr(ev, "ce_loss_fn", lambda y: "ste")
    monkeypatch.setattr(ev, "fixed_routing_ce_fn", lambda y, expert, gate=None: "fix")
    monkeypatch.setattr(ev, "router_decision_loss_fn", lambda expert: "route")
    y = torch.arange(8) % 10
    x = torch.zeros(8, 3, 4, 4)
    x[:, 0, 0, 0] = y / 10
    out = ev.evaluate(_Stub(), [(x, y)], ev.EvalConfig(EPS, STEP, STEPS, seed=SEED, progress=False), "cpu",
                      moe_metrics=False)
    assert out["sa"] == 100.0
    assert out["ra_ste"] == 100 * (8 - len(ste_flips)) / 8
    assert out["ra_routing_attack"] == 100 * (8 - len(route_flips)) / 8
    assert out["ra"] == 100 * (8 - len(ste_flips | fix_flips | route_flips)) / 8


def test_dense_models_have_no_second_attack():
    torch.manual_seed(seeded(0))
    model = models.build_model("resnet18_cifar_ori", ratio=0.125).eval()
    x, y = _batch(model)
    out = _evaluate(model, x, y)
    assert "ra_ste" not in out and "router_robustness" not in out


def _router_bn_variances(model, x):
    """(running variance, variance of the layer's input over x) of the router's last BatchNorm."""
    bn = balance._router_batchnorms(model)[-1]
    seen = []
    handle = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].var(dim=(0, 2, 3), unbiased=True)))
    with torch.no_grad():
        model.route(x)
    handle.remove()
    return bn.running_var.clone(), seen[0]


@pytest.mark.slow
def test_router_statistics_follow_the_router_weights():
    model = _model().train()
    x, _ = _batch(model, 64)
    balance.calibrate_router_statistics(model, x)
    with torch.no_grad():  # the router's weights grow, as they did under training
        for m in model.router.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(3.0)
    running, actual = _router_bn_variances(model, x)
    assert (actual / running).median() > 100  # fixed statistics have fallen far behind
    for _ in range(60):  # momentum 0.1: 0.9 ** 60 < 0.2% of the old value is left
        balance.track_router_statistics(model, x)
    running, actual = _router_bn_variances(model, x)
    assert torch.allclose(running, actual, rtol=0.05)
    bns = balance._router_batchnorms(model)
    assert not any(bn.training for bn in bns) and model.router.training  # routing still on running statistics


def test_router_statistics_are_averaged_over_processes():
    model = _model().train()
    x, _ = _batch(model, 16)
    bn = balance._router_batchnorms(model)[0]
    before = bn.running_mean.clone()
    balance.track_router_statistics(model, x, average=lambda t: t * 0 + 7.0)
    assert not torch.equal(before, bn.running_mean) and torch.all(bn.running_mean == 7.0)

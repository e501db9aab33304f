"""The lean AdvMoE step: exactly the passes that feed a gradient or a reported number (issue 5, item 3).

Expected passes of one TRADES update (`robust_loss`) with a K-step attack, for a globally routed MoE
(every backbone forward `model(x)` also runs the router once, on the same images, in the same mode):
    1 eval forward of the clean images, no grad (the attack's KL target)
    K eval forwards of the adversarial images (one per attack step, each with one input-gradient backward)
    2 train forwards (clean and adversarial images, the two terms of the loss), then 1 backward.
So per `robust_loss`: backbone and router each run 1 + K times in eval mode and 2 times in train mode;
there is no separate `model.route` call (the router's logits come with the model's forward).
    joint_step  = 1 robust_loss                         -> eval 1 + K, train 2;  autograd: K grads, 1 backward
    advmoe_step = router_step + expert_step, 2 of them  -> eval 2(1 + K), train 4; autograd: 2K grads, 2 backwards
plus, after each update of the router, one router-only pass without gradient that moves the router's BatchNorm
statistics (`RouterUpkeep`; with a balancing mode that acts after updates, one more, in eval mode, on the images it
balances).
BatchNorm running statistics: each backbone BatchNorm moves once per update of the backbone. The part that
is frozen in a step normalises with batch statistics but does not move them, and of the two train forwards
of a TRADES update only one moves them, so in one advmoe_step (and in one joint_step) every backbone
BatchNorm has `num_batches_tracked` + 1. The router's BatchNorms always use their running statistics in the
passes that route, so that an image's expert does not depend on its batch; the separate pass after a router
update moves them once.
"""
from collections import Counter

import pytest
import torch
from torch import nn

import models
from utils import advmoe, steps, update
from utils.balance import RouterUpkeep
from utils.update import StepContext
from conftest import seeded

K = 2  # attack steps


def _model(n_expert=2):
    torch.manual_seed(seeded(0))
    return models.build_model("resnet18_cifar_moe", ratio=0.125, n_expert=n_expert).train()


def _batch(b=8):
    g = torch.Generator().manual_seed(seeded(1))
    return torch.rand(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)


class PassCounter:
    """Counts forward calls of the whole model ('backbone') and of its router, by mode; and autograd calls."""

    def __init__(self, model, monkeypatch):
        self.calls = Counter()
        self.handles = [model.register_forward_pre_hook(self._hook("backbone")),
                        model.router.register_forward_pre_hook(self._hook("router"))]
        grad, backward = torch.autograd.grad, torch.autograd.backward

        def counted_grad(*args, **kwargs):
            self.calls["autograd.grad"] += 1
            return grad(*args, **kwargs)

        def counted_backward(*args, **kwargs):
            self.calls["backward"] += 1
            return backward(*args, **kwargs)
        monkeypatch.setattr(torch.autograd, "grad", counted_grad)
        monkeypatch.setattr(torch.autograd, "backward", counted_backward)  # Tensor.backward calls it

    def _hook(self, part):
        def hook(module, inputs):
            self.calls[(part, "train" if module.training else "eval")] += 1
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _bn_counts(model):
    """num_batches_tracked of every BatchNorm, split into (backbone, router) dicts keyed by module name."""
    backbone, router = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            (router if name.startswith("router.") else backbone)[name] = int(m.num_batches_tracked)
    return backbone, router


def _cfg():
    # The CLI's step without the bias re-centring pass, counted on its own below.
    return steps.StepConfig(at="trades", num_steps=K, balance="none")


def _upkeep(mode="none", logit_cap=0.0):
    return RouterUpkeep(mode, 1.0, logit_cap)


def _optimizers(model):
    return (torch.optim.SGD(model.backbone_parameters(), lr=0.01),
            torch.optim.SGD(model.router_parameters(), lr=0.01))


def _expected(updates, router_updates=1):
    return {("backbone", "eval"): updates * (1 + K), ("backbone", "train"): updates * 2,
            ("router", "eval"): updates * (1 + K), ("router", "train"): updates * 2 + router_updates,
            "autograd.grad": updates * K, "backward": updates}


@pytest.mark.parametrize("n_expert", [2, 4])
def test_advmoe_step_passes(monkeypatch, n_expert):
    model = _model(n_expert)
    x, y = _batch()
    opt, router_opt = _optimizers(model)
    counter = PassCounter(model, monkeypatch)
    advmoe.advmoe_step(model, x, y, _cfg(), StepContext(opt, router_opt), upkeep=_upkeep())
    counter.remove()
    assert dict(counter.calls) == _expected(2)


@pytest.mark.parametrize("mode,logit_cap", [("median", 0.0), ("bias", 2.0), ("none", 2.0)])
def test_balancing_adds_one_router_pass_per_router_update(monkeypatch, mode, logit_cap):
    """After the router's update, one router-only eval forward (no gradient) serves the balancing and the logit
    cap together."""
    model = _model()
    x, y = _batch()
    opt, router_opt = _optimizers(model)
    counter = PassCounter(model, monkeypatch)
    advmoe.advmoe_step(model, x, y, _cfg(), StepContext(opt, router_opt), upkeep=_upkeep(mode, logit_cap))
    counter.remove()
    want = _expected(2)
    want[("router", "eval")] += 1  # the balancing pass
    assert dict(counter.calls) == want


def test_joint_step_passes(monkeypatch):
    model = _model()
    x, y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counter = PassCounter(model, monkeypatch)
    steps.joint_step(model, x, y, _cfg(), StepContext(opt), upkeep=_upkeep())
    counter.remove()
    assert dict(counter.calls) == _expected(1)


def test_advmoe_step_moves_every_batchnorm_once():
    model = _model()
    x, y = _batch()
    opt, router_opt = _optimizers(model)
    backbone0, router0 = _bn_counts(model)
    assert backbone0 and router0
    advmoe.advmoe_step(model, x, y, _cfg(), StepContext(opt, router_opt), upkeep=_upkeep())
    backbone1, router1 = _bn_counts(model)
    assert {k: v - backbone0[k] for k, v in backbone1.items()} == {k: 1 for k in backbone0}
    assert {k: v - router0[k] for k, v in router1.items()} == {k: 1 for k in router0}


def test_joint_step_moves_every_batchnorm_once():
    model = _model()
    x, y = _batch()
    before = _bn_counts(model)
    steps.joint_step(model, x, y, _cfg(), StepContext(torch.optim.SGD(model.parameters(), lr=0.01)), upkeep=_upkeep())
    after = _bn_counts(model)
    assert {k: v - before[0][k] for k, v in after[0].items()} == {k: 1 for k in before[0]}
    assert {k: v - before[1][k] for k, v in after[1].items()} == {k: 1 for k in before[1]}


def test_each_step_computes_only_its_own_gradients():
    """Router step: no weight gradient for the backbone; expert step: none for the router."""
    model = _model()
    x, y = _batch()
    opt, router_opt = _optimizers(model)
    advmoe.router_step(model, x, y, _cfg(), StepContext(router_optimizer=router_opt))
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.router_parameters())
    router_opt.zero_grad(set_to_none=True)
    advmoe.expert_step(model, x, y, _cfg(), StepContext(opt))
    assert all(p.grad is None for p in model.router_parameters())
    assert sum(p.grad is not None for p in model.backbone_parameters()) == len(model.backbone_parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_reference_router_objective_passes_and_value(monkeypatch):
    """The released code's router objective: the router's logits come with the model's forward (no extra
    router pass), then 2 router-only train passes (clean, adversarial); the upkeep's pass then moves the router's
    BatchNorm statistics, once."""
    model = _model()
    x, y = _batch()
    cfg = steps.StepConfig(at="trades", num_steps=K, router_objective="reference", balance="none")
    _, router_opt = _optimizers(model)
    before = _bn_counts(model)
    counter = PassCounter(model, monkeypatch)
    advmoe.router_step(model, x, y, cfg, StepContext(router_optimizer=router_opt))
    assert _bn_counts(model) == before  # the loss's passes move no statistics
    _upkeep().after_router_update(model, x)
    counter.remove()
    assert dict(counter.calls) == {("backbone", "eval"): 1 + K, ("router", "eval"): 1 + K,
                                   ("router", "train"): 3, "autograd.grad": K, "backward": 1}
    after = _bn_counts(model)
    assert after[0] == before[0]  # backbone frozen
    assert {k: v - before[1][k] for k, v in after[1].items()} == {k: 1 for k in before[1]}

    # Its value: alpha * CE(router(x), y mod N) + beta * KL(router(x) || router(x_adv)) / B.
    model = _model()
    out = advmoe.reference_router_loss(model, x, y, cfg, generator=torch.Generator().manual_seed(seeded(3)))
    with update.running_stats_frozen(list(model.modules())):
        r_clean, r_adv = model.route(x), model.route(out["x_adv"])
    p, log_p, log_q = r_clean.softmax(1), r_clean.log_softmax(1), r_adv.log_softmax(1)
    kl = (p * (log_p - log_q)).sum() / len(y)
    want = cfg.alpha * torch.nn.functional.cross_entropy(r_clean, y % 2) + cfg.beta * kl
    assert torch.allclose(out["loss"], want, rtol=1e-5, atol=1e-6)

"""AdvMoE: router-expert alternating adversarial training (Zhang et al., ICCV 2023), and its baselines.

One training update of an MoE-CNN is either
- `advmoe_step`: the paper's bi-level problem solved by alternation, per batch
  1. `router_step`: adversarial examples against the current MoE, then only the router parameters
     move to lower the robust loss of the whole MoE on them (experts frozen);
  2. `expert_step`: fresh adversarial examples against the MoE with the updated router, then only
     the backbone (expert) parameters move (router frozen);
- `joint_step`: conventional adversarial training of the MoE, router and experts in one update.

The robust loss is TRADES or PGD-AT (`cfg.at`), as in dense training. `router_objective="reference"`
replaces the router step's loss with the released code's
`alpha * CE(router(x), y mod N) + beta * KL(router(x_adv) || router(x)) / B`, its attack adding the
router's KL to the model's.

Lean by construction: frozen parameters have `requires_grad` off during a step (autograd skips their
weight gradients), and the frozen part's BatchNorm layers normalise with batch statistics without
moving their running statistics; of TRADES' clean and adversarial training-mode passes only the adversarial
one moves them. So each BatchNorm is updated once per batch, by the step that trains it. No pass is run
that does not feed a gradient or a reported number (tests/test_lean_step.py counts them).
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import backbone_modules, router_modules
from .attack import eval_mode, kl_divergence, pgd_attack
from .losses import robust_loss


class NonFiniteError(RuntimeError):
    """A loss or the router went NaN/inf: training stops before anything bad is saved."""


@dataclass(frozen=True)
class StepConfig:
    """Attack and objective of a training step (eps and step size in [0,1] pixel units).

    The defaults are the command line's (args.py), so `StepConfig()` is the step a user runs by default;
    a run builds its settings with `from_args`.
    """
    at: str = "trades"
    eps: float = 8 / 255
    step_size: float = 5 / 255
    num_steps: int = 2
    beta: float = 6.0
    alpha: float = 6.0
    router_objective: str = "robust"
    balance_weight: float = 0.0
    router_grad_clip: float = 1.0
    balance_bias: bool = True
    grad_clip: float = 1.0

    @classmethod
    def from_args(cls, args):
        """The step settings of a run, from its parsed flags (every one of them must be there)."""
        return cls(at=args.at, eps=args.epsilon, step_size=args.step_size, num_steps=args.num_steps,
                   beta=args.beta, alpha=args.alpha, router_objective=args.router_objective,
                   balance_weight=args.balance_weight, router_grad_clip=args.router_grad_clip,
                   balance_bias=args.balance_bias, grad_clip=args.grad_clip)


@contextmanager
def frozen(params):
    """Temporarily stop gradients to `params` (restores each flag)."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@contextmanager
def running_stats_frozen(modules):
    """BatchNorm layers in `modules` use batch statistics in train mode but leave running stats alone."""
    bns = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    flags = [bn.track_running_stats for bn in bns]
    try:
        for bn in bns:
            bn.track_running_stats = False
        yield
    finally:
        for bn, flag in zip(bns, flags):
            bn.track_running_stats = flag


def check_finite(tensor, what):
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"{what} is not finite (NaN/inf); stopping, last good checkpoint kept")


def load_balance_loss(router_logits, n_expert):
    """Switch-Transformer load balancing, N * sum_e f_e * P_e: 1 when balanced, N when one expert takes all.

    f_e is the share of images routed to e (no gradient), P_e the mean router probability of e; the
    gradient lowers the probabilities of overloaded experts. `router_logits` (B, N) or a list of them
    (layer routing, averaged).
    """
    if isinstance(router_logits, (list, tuple)):
        return sum(load_balance_loss(lg, n_expert) for lg in router_logits) / len(router_logits)
    probs = F.softmax(router_logits.float(), dim=1)  # (B, N)
    share = F.one_hot(router_logits.argmax(1), n_expert).float().mean(0)  # (N,)
    return n_expert * (share * probs.mean(0)).sum()


def _robust(model, x, y, cfg, generator, routing=False):
    """The robust loss. With `routing` (an MoE), plus balance_weight x the load-balancing loss of the router
    logits of the first training-mode forward (the clean batch for TRADES, the adversarial one for PGD-AT).

    Of TRADES' two training-mode passes only the adversarial one moves BatchNorm running statistics (the
    clean one normalises with its own batch statistics all the same, so losses and gradients are those of
    two plain train-mode passes): each BatchNorm moves once per update, as with PGD-AT's single pass.
    """
    routing = routing and getattr(model, "is_moe", False)
    routed = []

    def forward(m, inp):
        with running_stats_frozen(list(m.modules())) if inp is x else nullcontext():
            if not routing:
                return m(inp)
            logits, info = m(inp, return_routing=True)
        routed.append(info.logits)
        return logits

    out = robust_loss(model, x, y, at=cfg.at, eps=cfg.eps, step_size=cfg.step_size, num_steps=cfg.num_steps,
                      beta=cfg.beta, generator=generator, forward=forward)
    if routing and cfg.balance_weight > 0:
        out["balance_loss"] = load_balance_loss(routed[0], model.n_expert)
        out["loss"] = out["loss"] + cfg.balance_weight * out["balance_loss"]
    return out


def _update(optimizer, loss, scaler=None, grad_sync=None, clips=()):
    """Backward and step; `grad_sync(params)` (distributed gradient averaging) runs in between, then
    gradient-norm clipping: `clips` is a sequence of (params, max_norm), each group clipped on its own
    (max_norm 0: that group is not clipped)."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if grad_sync is not None:
        grad_sync(params)
    clips = [(list(group), norm) for group, norm in clips if norm > 0]
    if clips and scaler is not None:
        scaler.unscale_(optimizer)
    for group, norm in clips:
        torch.nn.utils.clip_grad_norm_(group, norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def reference_router_loss(model, x, y, cfg, generator=None):
    """The released code's router objective (pure): returns dict(loss, x_adv).

    Attack: TRADES-style, maximising KL(model(x)||model(x_adv)) + KL(router(x)||router(x_adv)).
    Loss: alpha * CE(router(x), y mod N) + beta * KL(router(x) || router(x_adv)) / B, both router
    forwards in the caller's mode; only the adversarial one moves the router's BatchNorm running statistics.
    KL is computed from log-probabilities, so no NaN on underflow. The router's logits are taken from the
    model's own forward (`return_routing`), not from a second router pass.
    """
    with torch.no_grad(), eval_mode(model):
        logits_clean, info = model(x, return_routing=True)
    router_clean = info.logits

    def attack_loss(m, x_adv):
        logits, info_adv = m(x_adv, return_routing=True)
        return kl_divergence(logits_clean, logits) + kl_divergence(router_clean, info_adv.logits)

    x_adv = pgd_attack(model, x, attack_loss, eps=cfg.eps, step_size=cfg.step_size,
                       num_steps=cfg.num_steps, random_start="normal", generator=generator)
    r_clean, r_adv = model.route(x), model.route(x_adv)  # the router's BatchNorm uses running statistics
    kl = kl_divergence(r_clean, r_adv) / x.shape[0]
    loss = cfg.alpha * F.cross_entropy(r_clean.float(), y % model.n_expert) + cfg.beta * kl
    return {"loss": loss, "x_adv": x_adv}


def router_step(model, x, y, cfg: StepConfig, router_optimizer, scaler=None, generator=None, grad_sync=None,
                average=None):
    """Update the router only (experts frozen). Returns the step's loss dict.

    Then the router's BatchNorm statistics follow the update (`track_router_statistics`) and, with
    `cfg.balance_bias`, its output bias is re-centred on the updated router's logits for the batch
    (`center_router_bias`; `average` averages both over processes). Centring on the logits from before the
    update would miss the shift the update itself makes, which the straight-through gradient makes in the same
    direction step after step.
    """
    with frozen(model.backbone_parameters()), running_stats_frozen(backbone_modules(model)):
        if cfg.router_objective == "reference":
            out = reference_router_loss(model, x, y, cfg, generator)
        else:
            out = _robust(model, x, y, cfg, generator, routing=True)
        check_finite(out["loss"], "router-step loss")
        _update(router_optimizer, out["loss"], scaler, grad_sync,
                clips=[(model.router_parameters(), cfg.router_grad_clip)])
    _after_router_update(model, x, cfg, average)
    return out


def _after_router_update(model, x, cfg, average):
    """After the global router moved: its BatchNorm statistics follow it (`track_router_statistics`), then, with
    `cfg.balance_bias`, its output bias is re-centred on the updated router's logits for the batch (one router-only
    forward each, without gradient)."""
    if not (getattr(model, "is_moe", False) and model.routing_mode == "global"):
        return
    with torch.no_grad():
        track_router_statistics(model, x, average)
        if cfg.balance_bias:
            center_router_bias(model, model.route(x), average)


def expert_step(model, x, y, cfg: StepConfig, optimizer, scaler=None, generator=None, grad_sync=None):
    """Update the backbone (experts and shared layers) only, router frozen, its gradient norm clipped at
    `cfg.grad_clip`. Returns the loss dict."""
    with frozen(model.router_parameters()), running_stats_frozen(router_modules(model)):
        out = _robust(model, x, y, cfg, generator)
        check_finite(out["loss"], "expert-step loss")
        _update(optimizer, out["loss"], scaler, grad_sync, clips=[(model.backbone_parameters(), cfg.grad_clip)])
    return out


def advmoe_step(model, x, y, cfg: StepConfig, optimizer, router_optimizer, scaler=None, generator=None,
                grad_sync=None, average=None):
    """One AdvMoE update: router step, then expert step on fresh adversarial examples."""
    r = router_step(model, x, y, cfg, router_optimizer, scaler, generator, grad_sync, average)
    for p in model.router_parameters():
        check_finite(p, "router parameter")
    out = expert_step(model, x, y, cfg, optimizer, scaler, generator, grad_sync)
    out["router_loss"] = r["loss"].detach()
    return out


def joint_step(model, x, y, cfg: StepConfig, optimizer, scaler=None, generator=None, grad_sync=None,
               average=None):
    """Conventional adversarial training of the whole model (dense, or MoE router and experts together);
    the gradient norm is clipped at `cfg.grad_clip` (a dense model: all its parameters; an MoE: the backbone,
    and the router on its own at `cfg.router_grad_clip`, as in AdvMoE's two steps). For an MoE, with
    `cfg.balance_bias`, the router's bias is re-centred after the update (and its BatchNorm statistics follow
    it), as in AdvMoE's router step."""
    out = _robust(model, x, y, cfg, generator, routing=True)
    check_finite(out["loss"], "training loss")
    if getattr(model, "is_moe", False):
        clips = [(model.router_parameters(), cfg.router_grad_clip), (model.backbone_parameters(), cfg.grad_clip)]
    else:
        clips = [(model.parameters(), cfg.grad_clip)]
    _update(optimizer, out["loss"], scaler, grad_sync, clips=clips)
    _after_router_update(model, x, cfg, average)
    return out


@torch.no_grad()
def calibrate_router_statistics(model, x):
    """Set the global router's BatchNorm running statistics to those of images `x` (one batch, in [0, 1]).

    The router normalises with running statistics in training too (models.layers.Router), so they must
    describe real data: each BatchNorm gets the mean and variance of its input over `x`, as a train-mode
    pass computes them.
    """
    bns = _router_batchnorms(model)
    saved = [(bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one pass, exactly this batch's statistics
        bn.train(True)
    try:
        model.router(model.normalize(x))
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)


def _router_batchnorms(model):
    return [m for m in model.router.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def track_router_statistics(model, x, average=None):
    """Move the global router's BatchNorm running statistics towards those of images `x` (in [0, 1]) by each
    layer's momentum, as a train-mode pass does; `average(tensor)` averages them over processes.

    The router normalises with its running statistics (models.layers.Router), so they must follow its weights as
    it trains. Fixed at their starting values they fell behind: on Digits (r=0.5, N=2) the activations' variance
    reached 1e13 against running variances of 0.1 within 4 epochs, the logits 1e14, at which float32 cannot tell
    the experts apart (every image went to expert 0) and the straight-through gradient swamped the experts' own.
    """
    bns = _router_batchnorms(model)
    for bn in bns:
        bn.train(True)
    try:
        model.router(model.normalize(x))
    finally:
        for bn in bns:
            bn.train(False)
    if average is not None:
        for bn in bns:
            bn.running_mean.copy_(average(bn.running_mean))
            bn.running_var.copy_(average(bn.running_var))


@torch.no_grad()
def center_router_bias(model, router_logits, average=None):
    """Shift the global router's output bias so that every expert's median logit margin over the images
    behind `router_logits` (B, N) is zero: with 2 experts, half of them on each; with more, close to an
    even split. `average(tensor)` averages the shift over processes (distributed runs keep one router).

    Decisions stay `argmax` of the logits; what the router learns is which images go where. Without this
    the straight-through gradient drives the router to one expert within a few batches (the better-trained
    expert lowers the loss of any image routed to it, so it attracts more images and trains more), and a
    load-balancing loss alone does not hold it.
    """
    if not getattr(model, "is_moe", False) or model.routing_mode != "global" or model.n_expert < 2:
        return
    logits = router_logits.detach().float()
    shift = (logits - logits.mean(dim=1, keepdim=True)).median(dim=0).values  # (N,)
    if average is not None:
        shift = average(shift)
    model.router.fc.bias -= shift.to(model.router.fc.bias.dtype)


@torch.no_grad()
def balance_router_init(model, x):
    """Data-dependent start of a fresh global router on training images `x`: BatchNorm running statistics
    from `x` (`calibrate_router_statistics`), then the output bias centred on `x` (`center_router_bias`).

    A freshly initialised router sends nearly every image to one expert (the logits are dominated by a
    component shared by all images), and the straight-through gradient then only ever sees that expert.
    """
    if not getattr(model, "is_moe", False) or model.routing_mode != "global" or model.n_expert < 2:
        return
    calibrate_router_statistics(model, x)
    center_router_bias(model, model.route(x))

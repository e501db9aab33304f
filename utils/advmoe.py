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
from .attack import attack_precision, eval_mode, kl_divergence, pgd_attack
from .balance import DEFAULT_STRENGTH, LOSS_MODES, RouterUpkeep, balance_loss
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
    balance: str = "median"
    balance_strength: float = DEFAULT_STRENGTH["median"]
    router_grad_clip: float = 1.0
    grad_clip: float = 1.0

    @classmethod
    def from_args(cls, args):
        """The step settings of a run, from its parsed flags (every one of them must be there)."""
        return cls(at=args.at, eps=args.epsilon, step_size=args.step_size, num_steps=args.num_steps,
                   beta=args.beta, alpha=args.alpha, router_objective=args.router_objective,
                   balance=args.balance, balance_strength=args.balance_strength,
                   router_grad_clip=args.router_grad_clip, grad_clip=args.grad_clip)


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


def check_finite(tensors, what, average=None):
    """Raise NonFiniteError when a tensor of `tensors` (one tensor or a sequence) holds NaN or inf.

    One host-device sync for all of them (the router's 59 parameters were 59 round trips). `average(tensor)`
    (averaging over processes) makes every process raise when one does: a process stopping alone would leave
    the others waiting in their next collective until its timeout.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    bad = torch.stack([~torch.isfinite(t.detach()).all() for t in tensors]).any().float()
    if average is not None:
        bad = average(bad)
    if bad.item() > 0:
        where = " on some process" if average is not None else ""
        raise NonFiniteError(f"{what} is not finite (NaN/inf){where}; stopping, last good checkpoint kept")


def _robust(model, x, y, cfg, generator, routing=False):
    """The robust loss. With `routing` (an MoE) and a loss-based `cfg.balance` (switch, entropy), plus
    `cfg.balance_strength` x that balancing loss of the router logits of the first training-mode forward (the
    clean batch for TRADES, the adversarial one for PGD-AT).

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
    if routing and cfg.balance in LOSS_MODES and cfg.balance_strength > 0:
        out["balance_loss"] = balance_loss(cfg.balance, routed[0], model.n_expert)
        out["loss"] = out["loss"] + cfg.balance_strength * out["balance_loss"]
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
    with torch.no_grad(), eval_mode(model), attack_precision(x):
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
    """Update the router only (experts frozen) to lower the robust loss of the whole MoE. Returns the loss dict."""
    with frozen(model.backbone_parameters()), running_stats_frozen(backbone_modules(model)):
        if cfg.router_objective == "reference":
            out = reference_router_loss(model, x, y, cfg, generator)
        else:
            out = _robust(model, x, y, cfg, generator, routing=True)
        check_finite(out["loss"], "router-step loss", average)
        _update(router_optimizer, out["loss"], scaler, grad_sync,
                clips=[(model.router_parameters(), cfg.router_grad_clip)])
    return out


def expert_step(model, x, y, cfg: StepConfig, optimizer, scaler=None, generator=None, grad_sync=None,
                average=None):
    """Update the backbone (experts and shared layers) only, router frozen, its gradient norm clipped at
    `cfg.grad_clip`. Returns the loss dict. `average` (over processes) agrees on a non-finite loss."""
    with frozen(model.router_parameters()), running_stats_frozen(router_modules(model)):
        out = _robust(model, x, y, cfg, generator)
        check_finite(out["loss"], "expert-step loss", average)
        _update(optimizer, out["loss"], scaler, grad_sync, clips=[(model.backbone_parameters(), cfg.grad_clip)])
    return out


def advmoe_step(model, x, y, cfg: StepConfig, optimizer, router_optimizer, scaler=None, generator=None,
                grad_sync=None, upkeep: RouterUpkeep | None = None, average=None):
    """One AdvMoE update: router step, then expert step on fresh adversarial examples.

    In between, not in the paper: `upkeep.after_router_update` (the router's BatchNorm statistics follow the
    update, then load balancing, `utils.balance`); it runs on the updated router, since balancing on the logits
    from before the update would miss the shift the update itself makes. `average` (over processes) makes every
    process stop when one sees a non-finite value.
    """
    r = router_step(model, x, y, cfg, router_optimizer, scaler, generator, grad_sync, average)
    if upkeep is not None:
        upkeep.after_router_update(model, x)
    check_finite(model.router_parameters(), "a router parameter", average)
    out = expert_step(model, x, y, cfg, optimizer, scaler, generator, grad_sync, average)
    out["router_loss"] = r["loss"].detach()
    return out


def joint_step(model, x, y, cfg: StepConfig, optimizer, scaler=None, generator=None, grad_sync=None,
               upkeep: RouterUpkeep | None = None, average=None):
    """Conventional adversarial training of the whole model (dense, or MoE router and experts together);
    the gradient norm is clipped at `cfg.grad_clip` (a dense model: all its parameters; an MoE: the backbone,
    and the router on its own at `cfg.router_grad_clip`, as in AdvMoE's two steps). For an MoE, the same
    `upkeep` as in AdvMoE follows the update."""
    out = _robust(model, x, y, cfg, generator, routing=True)
    check_finite(out["loss"], "training loss", average)
    if getattr(model, "is_moe", False):
        clips = [(model.router_parameters(), cfg.router_grad_clip), (model.backbone_parameters(), cfg.grad_clip)]
    else:
        clips = [(model.parameters(), cfg.grad_clip)]
    _update(optimizer, out["loss"], scaler, grad_sync, clips=clips)
    if upkeep is not None:
        upkeep.after_router_update(model, x)
    return out

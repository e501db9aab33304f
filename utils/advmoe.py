"""AdvMoE: router-expert alternating adversarial training (Zhang et al., ICCV 2023), the algorithm only.

The paper's bi-level problem, solved by alternation on every batch (`advmoe_step`):
  1. `router_step`: adversarial examples against the current MoE; then only the router's parameters move, to
     lower the robust loss of the whole MoE on them (experts frozen);
  2. `expert_step`: fresh adversarial examples against the MoE with the updated router; then only the backbone
     (experts and shared layers) moves (router frozen).
The robust loss is TRADES or PGD-AT (`cfg.at`), as in dense training (`utils.losses.robust_loss`).
`cfg.router_objective == "reference"` replaces the router step's loss with the released code's
(`reference_router_loss`).

What the paper does not have is called from `advmoe_step`, each where it acts, and each can be switched off:
a load-balancing loss in the router step (`--balance switch|entropy`); after the router update, the router's
BatchNorm statistics follow it and its logit scale and load are kept in check (`utils.balance.RouterUpkeep`:
`--router-logit-cap`, `--balance median|bias|bias-sign`); gradient-norm clipping (`--router-grad-clip`,
`--grad-clip`); a stop on non-finite values.

Lean by construction: frozen parameters have `requires_grad` off during a step (autograd skips their weight
gradients), and the frozen part's BatchNorm layers normalise with batch statistics without moving their running
statistics; so each BatchNorm is updated once per batch, by the step that trains it (tests/test_lean_step.py).
"""
import torch
import torch.nn.functional as F

from models.base import backbone_modules, router_modules
from .attack import attack_precision, eval_mode, kl_divergence, pgd_attack
from .balance import RouterUpkeep, add_balance_term, loss_balancing
from .losses import robust_loss
from .steps import StepConfig
from .update import StepContext, apply_update, check_finite, frozen, running_stats_frozen


def reference_router_loss(model, x, y, cfg: StepConfig, generator=None):
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


def router_step(model, x, y, cfg: StepConfig, ctx: StepContext, balance=None):
    """Step 1: update the router only (experts frozen) with `ctx.router_optimizer`, to lower the robust loss of
    the whole MoE on adversarial examples against it; its gradient norm is clipped at `cfg.router_grad_clip`.
    `balance(router_logits)`, when given, is a load-balancing term added to the loss (not in the paper).
    Returns the loss dict."""
    with frozen(model.backbone_parameters()), running_stats_frozen(backbone_modules(model)):
        if cfg.router_objective == "reference":
            out = reference_router_loss(model, x, y, cfg, ctx.generator)
        else:
            out = robust_loss(model, x, y, cfg, ctx.generator)
            if balance is not None:
                add_balance_term(out, balance)
        check_finite(out["loss"], "router-step loss", ctx.average)
        apply_update(ctx.router_optimizer, out["loss"], ctx, clips=[(model.router_parameters(), cfg.router_grad_clip)])
    return out


def expert_step(model, x, y, cfg: StepConfig, ctx: StepContext):
    """Step 2: update the backbone only (experts and shared layers; router frozen) with `ctx.optimizer`, to lower
    the robust loss on fresh adversarial examples; its gradient norm is clipped at `cfg.grad_clip`. Returns the
    loss dict."""
    with frozen(model.router_parameters()), running_stats_frozen(router_modules(model)):
        out = robust_loss(model, x, y, cfg, ctx.generator)
        check_finite(out["loss"], "expert-step loss", ctx.average)
        apply_update(ctx.optimizer, out["loss"], ctx, clips=[(model.backbone_parameters(), cfg.grad_clip)])
    return out


def advmoe_step(model, x, y, cfg: StepConfig, ctx: StepContext, upkeep: RouterUpkeep | None = None):
    """One AdvMoE update of an MoE on the batch (x, y): the router step, then the expert step. Returns the expert
    step's loss dict, with the router step's loss under `router_loss`.

    `ctx` holds both optimizers; `upkeep` (None: none) is the router upkeep that follows the router update.
    """
    # 1. Router step (experts frozen); not in the paper: a load-balancing loss term with --balance switch|entropy.
    router_out = router_step(model, x, y, cfg, ctx, balance=loss_balancing(cfg, model.n_expert))
    # Not in the paper: the router's BatchNorm statistics follow the update, then its logit scale is capped and its
    # load balanced (--router-logit-cap, --balance median|bias|bias-sign). It acts on the updated router: balancing
    # on the logits from before the update would miss the shift that the update itself makes.
    if upkeep is not None:
        upkeep.track_statistics(model, x)
        upkeep.balance(model, x)
    check_finite(model.router_parameters(), "a router parameter", ctx.average)
    # 2. Expert step (router frozen), on fresh adversarial examples against the updated router.
    out = expert_step(model, x, y, cfg, ctx)
    out["router_loss"] = router_out["loss"].detach()
    return out

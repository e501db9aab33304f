"""AdvMoE: router-expert alternating adversarial training (Zhang et al., ICCV 2023), the algorithm only.

The paper's bi-level problem, solved by alternation on every batch (`advmoe_step`):
  1. `router_step`: adversarial examples against the current MoE; then only the router's parameters move, to
     lower the robust loss of the whole MoE on them (experts frozen);
  2. `expert_step`: fresh adversarial examples against the MoE with the updated router; then only the backbone
     (experts and shared layers) moves (router frozen).
The robust loss is TRADES or PGD-AT (`cfg.at`), as in dense training (`utils.losses.robust_loss`).
`cfg.router_objective` "released" (or "reference", the README's weighting) replaces the router step's loss with
the released code's (`reference_router_loss`). The released code's loop (`--advmoe-recipe released`,
docs/routing.md) also runs the expert step first (`cfg.advmoe_order`) and adds the router's KL to both attacks
(`cfg.attack_router_kl`).
Robust-routing methods, not in the paper: adversarial training of the routing decision (`cfg.router_at`,
`utils.losses.router_adversarial_loss`), semantic router targets (`cfg.router_groups`, `class_partition`) and
training the expert a flip would send an image to (`cfg.flip_expert_at`, `utils.losses.flip_expert_loss`).

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
from models.layers.router import at_least_float32
from .attack import kl_divergence, pgd_attack
from .balance import RouterUpkeep, add_balance_term, loss_balancing
from .losses import flip_expert_loss, robust_loss, router_adversarial_loss, trades_attack_loss_fn
from .steps import StepConfig
from .update import StepContext, apply_update, check_finite, frozen, running_stats_frozen


def router_targets(y, cfg: StepConfig, n_expert):
    """The expert each image's class is sent to in the router's supervised terms (B,) long: `cfg.router_groups`
    (a tuple class -> expert, `--router-targets partition`) or class mod N (the released code)."""
    if cfg.router_groups is None:
        return y % n_expert
    return torch.as_tensor(cfg.router_groups, device=y.device)[y]


def class_partition(class_means, n_expert, iters=50):
    """Balanced groups of classes whose mean images lie far apart (`--router-targets partition`, not in the
    paper): a tuple class -> expert.

    class_means (C, D): each class's mean training image, flattened. Balanced k-means: groups of at most
    ceil(C / N) classes; seeds by farthest-point from class 0; each round assigns the (class, group) pairs
    closest first, within capacity, then moves each group's centre to its classes' mean; deterministic.
    """
    means = class_means.double()
    c = len(means)
    capacity = -(-c // n_expert)
    seeds = [0]
    while len(seeds) < n_expert:
        dist = torch.cdist(means, means[seeds]).min(dim=1).values
        seeds.append(int(dist.argmax()))
    centres = means[seeds]
    groups = None
    for _ in range(iters):
        dist = torch.cdist(means, centres)  # (C, N)
        order = sorted(((dist[k, g].item(), k, g) for k in range(c) for g in range(n_expert)))
        assign, count = [-1] * c, [0] * n_expert
        for _, k, g in order:
            if assign[k] < 0 and count[g] < capacity:
                assign[k], count[g] = g, count[g] + 1
        if assign == groups:
            break
        groups = assign
        centres = torch.stack([means[[k for k in range(c) if groups[k] == g]].mean(0) for g in range(n_expert)])
    return tuple(groups)


def reference_router_loss(model, x, y, cfg: StepConfig, generator=None):
    """The released code's router objective (pure): returns dict(loss, x_adv).

    Attack: TRADES-style, maximising KL(model(x)||model(x_adv)), plus KL(router(x)||router(x_adv)) unless
    `cfg.attack_router_kl` is "none". Loss: `w_ce * CE(router(x), t) + w_kl * KL(router(x) || router(x_adv)) / B`,
    t = `router_targets` (class mod N by default): `cfg.router_objective` "released" weighs them (1, alpha), as the
    released code's router step does; "reference" (alpha, beta), as shared/reference/README.md describes it (the
    rows run before the released code was read). The clean router logits carry gradient in both terms (as TRADES'
    clean logits do), both router forwards in the caller's mode; only the adversarial one moves the router's
    BatchNorm running statistics. KL is computed from log-probabilities, so no NaN on underflow. The attack's
    clean targets come from the model's own forward (`return_routing`), not from a second router pass.
    """
    attack_loss = trades_attack_loss_fn(model, x, router_kl=cfg.attack_router_kl != "none")
    x_adv = pgd_attack(model, x, attack_loss, eps=cfg.eps, step_size=cfg.step_size,
                       num_steps=cfg.num_steps, random_start="normal", generator=generator)
    r_clean, r_adv = model.route(x), model.route(x_adv)  # the router's BatchNorm uses running statistics
    kl = kl_divergence(r_clean, r_adv) / x.shape[0]
    target = router_targets(y, cfg, model.n_expert)
    w_ce, w_kl = (1.0, cfg.alpha) if cfg.router_objective == "released" else (cfg.alpha, cfg.beta)
    loss = w_ce * F.cross_entropy(at_least_float32(r_clean), target) + w_kl * kl
    return {"loss": loss, "x_adv": x_adv}


def router_step(model, x, y, cfg: StepConfig, ctx: StepContext, balance=None):
    """Update the router only (experts frozen) with `ctx.router_optimizer`, to lower the robust loss of the whole
    MoE on adversarial examples against it (`cfg.router_objective` robust; its attack router-aware with
    `cfg.attack_router_kl` router-step or both) or the released code's router loss (released, reference); its
    gradient norm is clipped at `cfg.router_grad_clip`. `balance(router_logits)`, when given, is a load-balancing term
    added to the robust loss (not in the paper); `cfg.router_at` > 0 adds that weight times the router's
    adversarial loss (`utils.losses.router_adversarial_loss`, not in the paper). Returns the loss dict."""
    with frozen(model.backbone_parameters()), running_stats_frozen(backbone_modules(model)):
        if cfg.router_objective in ("reference", "released"):
            out = reference_router_loss(model, x, y, cfg, ctx.generator)
        else:
            out = robust_loss(model, x, y, cfg, ctx.generator, router_kl=cfg.attack_router_kl != "none")
            if balance is not None:
                add_balance_term(out, balance)
        if cfg.router_at > 0:
            ra = router_adversarial_loss(model, x, router_targets(y, cfg, model.n_expert), cfg, ctx.generator)
            out["router_at_loss"] = ra["loss"]
            out["loss"] = out["loss"] + cfg.router_at * ra["loss"]
        check_finite(out["loss"], "router-step loss", ctx.average)
        apply_update(ctx.router_optimizer, out["loss"], ctx, clips=[(model.router_parameters(), cfg.router_grad_clip)])
    return out


def expert_step(model, x, y, cfg: StepConfig, ctx: StepContext):
    """Update the backbone only (experts and shared layers; router frozen) with `ctx.optimizer`, to lower the
    robust loss on fresh adversarial examples (their attack router-aware with `cfg.attack_router_kl` both); its
    gradient norm is clipped at `cfg.grad_clip`. `cfg.flip_expert_at` > 0 adds that weight times
    `utils.losses.flip_expert_loss` on the same adversarial examples (not in the paper). Returns the loss dict."""
    with frozen(model.router_parameters()), running_stats_frozen(router_modules(model)):
        out = robust_loss(model, x, y, cfg, ctx.generator, router_kl=cfg.attack_router_kl == "both")
        if cfg.flip_expert_at > 0:  # one more backbone pass; BatchNorm statistics move once per update all the same
            with torch.no_grad():
                scores = model.route_scores(x)
            with running_stats_frozen(backbone_modules(model)):
                out["flip_expert_loss"] = flip_expert_loss(model, out["x_adv"], y, scores)
            out["loss"] = out["loss"] + cfg.flip_expert_at * out["flip_expert_loss"]
        check_finite(out["loss"], "expert-step loss", ctx.average)
        apply_update(ctx.optimizer, out["loss"], ctx, clips=[(model.backbone_parameters(), cfg.grad_clip)])
    return out


def advmoe_step(model, x, y, cfg: StepConfig, ctx: StepContext, upkeep: RouterUpkeep | None = None):
    """One AdvMoE update of an MoE on the batch (x, y): the router step and the expert step, in the order of
    `cfg.advmoe_order` (router-first: the paper's and our default; expert-first: the released code's), each on
    its own fresh attack. Returns the expert step's loss dict, with the router step's loss under `router_loss`.

    `ctx` holds both optimizers; `upkeep` (None: none) is the router upkeep that follows the router update.
    """
    if cfg.advmoe_order == "expert-first":
        out = expert_step(model, x, y, cfg, ctx)
        router_out = _router_update(model, x, y, cfg, ctx, upkeep)
    elif cfg.advmoe_order == "router-first":
        router_out = _router_update(model, x, y, cfg, ctx, upkeep)
        # The expert step (router frozen), on fresh adversarial examples against the updated router.
        out = expert_step(model, x, y, cfg, ctx)
    else:
        raise ValueError(f"advmoe_order must be 'router-first' or 'expert-first', got {cfg.advmoe_order!r}")
    out["router_loss"] = router_out["loss"].detach()
    return out


def _router_update(model, x, y, cfg: StepConfig, ctx: StepContext, upkeep: RouterUpkeep | None):
    """The router step (experts frozen), then the upkeep that follows it; returns the router step's loss dict."""
    # Not in the paper: a load-balancing loss term with --balance switch|entropy.
    router_out = router_step(model, x, y, cfg, ctx, balance=loss_balancing(cfg, model.n_expert))
    # Not in the paper: the router's BatchNorm statistics follow the update, then its logit scale is capped and its
    # load balanced (--router-logit-cap, --balance median|bias|bias-sign). It acts on the updated router: balancing
    # on the logits from before the update would miss the shift that the update itself makes.
    if upkeep is not None:
        upkeep.track_statistics(model, x)
        upkeep.balance(model, x)
    check_finite(model.router_parameters(), "a router parameter", ctx.average)
    return router_out

"""Training objectives as pure functions: TRADES, PGD-AT (Madry) and fast AT (Wong et al. 2020).

They take a model and tensors and return a dict of tensors; they never zero gradients or step, and leave
the model in the mode they found it (the attack switches to eval mode and back; the training-mode forward
passes run in the caller's mode). Of TRADES' two training-mode passes only the adversarial one moves BatchNorm
running statistics (the clean one normalises with its own batch statistics all the same, so losses and gradients
are those of two plain train-mode passes): each BatchNorm moves once per update, as with PGD-AT's single pass.
"""
import torch
import torch.nn.functional as F

from models.layers.router import at_least_float32
from models.spec import is_moe

from .attack import attack_precision, ce_loss_fn, eval_mode, kl_divergence, pgd_attack, trades_kl_loss_fn
from .update import running_stats_frozen

FAST_STEP = 1.25  # fast AT's FGSM step in units of eps (Wong et al. 2020's choice)


def trades_objective(logits_clean, logits_adv, y, beta):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x_adv)) / B (the reference's batch-sum KL over B)."""
    loss_natural = F.cross_entropy(at_least_float32(logits_clean), y)
    loss_robust = kl_divergence(logits_clean, logits_adv) / y.shape[0]
    return {"loss": loss_natural + beta * loss_robust, "loss_natural": loss_natural, "loss_robust": loss_robust}


def pgd_at_objective(logits_adv, y):
    """PGD-AT (Madry et al.): mean cross-entropy on adversarial examples."""
    loss = F.cross_entropy(logits_adv.float(), y)
    return {"loss": loss, "loss_robust": loss}


def _train_forward(model, x):
    """Training-mode logits of `model` on `x`, and what its routing did when it is an MoE (a `RoutingInfo`; else
    None)."""
    if not is_moe(model):
        return model(x), None
    return model(x, return_routing=True)


def router_aware_kl_loss_fn(logits_clean, router_clean):
    """Attack loss of the released code's AdvMoE attacks: KL(f(x) || f(x_adv)) + KL(router(x) || router(x_adv)),
    summed, both clean targets fixed (detached); the router's logits come with the model's forward."""
    target, router_target = logits_clean.detach(), router_clean.detach()

    def loss(model, x_adv):
        logits, routing = model(x_adv, return_routing=True)
        return kl_divergence(target, logits) + kl_divergence(router_target, routing.logits)
    return loss


def trades_attack_loss_fn(model, x, router_kl=False):
    """The attack loss of a TRADES step on clean images `x`: TRADES' KL (`trades_kl_loss_fn`), or with `router_kl`
    the router-aware KL of the released code (`router_aware_kl_loss_fn`). The clean targets come from one eval
    forward without gradient, in float32."""
    with torch.no_grad(), eval_mode(model), attack_precision(x):
        if not router_kl:
            return trades_kl_loss_fn(model(x))
        logits, routing = model(x, return_routing=True)
    return router_aware_kl_loss_fn(logits, routing.logits)


def router_adversarial_loss(model, x, target, cfg, generator=None):
    """Adversarial training of the routing decision (not in the paper; `--router-at`): PGD from a uniform start
    (`cfg.num_steps` steps of `cfg.step_size` within `cfg.eps`, model in eval mode) maximising the router's
    summed CE(router(x_ra), target), then the mean CE(router(x_ra), target) in the caller's mode.
    `target` (B,) long: each image's expert. Returns dict(loss, x_ra)."""
    def attack_loss(m, x_adv):
        return F.cross_entropy(m.route(x_adv), target, reduction="sum")

    x_ra = pgd_attack(model, x, attack_loss, eps=cfg.eps, step_size=cfg.step_size, num_steps=cfg.num_steps,
                      random_start="uniform", generator=generator)
    return {"loss": F.cross_entropy(model.route(x_ra), target), "x_ra": x_ra}


def flip_expert_loss(model, x_adv, y, router_scores):
    """Routing flips made harmless (not in the paper; `--flip-expert-at`): mean CE(f(x_adv; e2), y), the MoE forced
    to send each image to its runner-up expert e2, the second-highest of its clean routing scores `router_scores`
    (B, N): the expert that an attack flipping its routing sends it to. In the caller's mode."""
    runner_up = router_scores.topk(2, dim=1).indices[:, 1]  # (B,)
    return F.cross_entropy(at_least_float32(model(x_adv, expert=runner_up)), y)


def robust_loss(model, x, y, cfg, generator=None, router_kl=False):
    """Adversarial training loss of `model` on (x, y): attack, then the objective.

    Args:
        cfg: the attack and objective, read as `cfg.at`, `cfg.eps`, `cfg.step_size`, `cfg.num_steps`, `cfg.beta`
            (a `utils.steps.StepConfig`).
        at: 'trades' (attack KL(f(x)||f(x_adv)) from a 0.001-normal start, loss trades_objective),
            'pgd' (attack cross-entropy from a uniform start, loss pgd_at_objective) or
            'fast' (one FGSM step of 1.25 eps on the cross-entropy from a uniform start, then pgd_at_objective:
            "Fast is better than free", Wong et al. 2020; `step_size` and `num_steps` are not used).
        eps, step_size: in [0,1] pixel units. num_steps: attack iterations. beta: TRADES' weight.
        generator: the attack's random start (None: torch's global RNG).
        router_kl: TRADES only, an MoE with a global router: the attack maximises KL(model) + KL(router), as the
            released code's AdvMoE attacks (`--attack-router-kl`).
    Returns the objective's dict plus `x_adv`, `logits_adv` (and `logits_clean` for TRADES), detached; for an MoE
    also `router_logits`, the router's logits in the first training-mode pass (the clean batch for TRADES, the
    adversarial one otherwise), for a load-balancing loss. TRADES runs the clean and adversarial batches as two
    forward passes, so BatchNorm sees each batch on its own, as in the reference.
    """
    at, eps, step_size, num_steps = cfg.at, cfg.eps, cfg.step_size, cfg.num_steps
    if router_kl and at != "trades":
        raise ValueError(f"router_kl adds the router's KL to TRADES' attack; at={at!r} attacks the cross-entropy")
    if at == "trades":
        x_adv = pgd_attack(model, x, trades_attack_loss_fn(model, x, router_kl), eps=eps, step_size=step_size,
                           num_steps=num_steps, random_start="normal", generator=generator)
        with running_stats_frozen(list(model.modules())):
            logits_clean, routing = _train_forward(model, x)
        logits_adv, _ = _train_forward(model, x_adv)
        out = trades_objective(logits_clean, logits_adv, y, cfg.beta)
        out["logits_clean"] = logits_clean.detach()
    elif at in ("pgd", "fast"):
        if at == "fast":
            step_size, num_steps = FAST_STEP * eps, 1
        x_adv = pgd_attack(model, x, ce_loss_fn(y), eps=eps, step_size=step_size, num_steps=num_steps,
                           random_start="uniform", generator=generator)
        logits_adv, routing = _train_forward(model, x_adv)
        out = pgd_at_objective(logits_adv, y)
    else:
        raise ValueError(f"at must be 'trades', 'pgd' or 'fast', got {at!r}")
    out.update(x_adv=x_adv, logits_adv=logits_adv.detach())
    if routing is not None:
        out["router_logits"] = routing.logits
    return out

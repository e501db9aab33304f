"""Training objectives as pure functions: TRADES, PGD-AT (Madry) and fast AT (Wong et al. 2020).

They take a model and tensors and return a dict of tensors; they never zero gradients or step, and leave
the model in the mode they found it (the attack switches to eval mode and back; the training-mode forward
passes run in the caller's mode). Of TRADES' two training-mode passes only the adversarial one moves BatchNorm
running statistics (the clean one normalises with its own batch statistics all the same, so losses and gradients
are those of two plain train-mode passes): each BatchNorm moves once per update, as with PGD-AT's single pass.
"""
import torch
import torch.nn.functional as F

from models.spec import is_moe
from .attack import attack_precision, ce_loss_fn, eval_mode, kl_divergence, pgd_attack, trades_kl_loss_fn
from .update import running_stats_frozen

FAST_STEP = 1.25  # fast AT's FGSM step in units of eps (Wong et al. 2020's choice)


def trades_objective(logits_clean, logits_adv, y, beta):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x_adv)) / B (the reference's batch-sum KL over B)."""
    loss_natural = F.cross_entropy(logits_clean.float(), y)
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


def robust_loss(model, x, y, cfg, generator=None):
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
    Returns the objective's dict plus `x_adv`, `logits_adv` (and `logits_clean` for TRADES), detached; for an MoE
    also `router_logits`, the router's logits in the first training-mode pass (the clean batch for TRADES, the
    adversarial one otherwise), for a load-balancing loss. TRADES runs the clean and adversarial batches as two
    forward passes, so BatchNorm sees each batch on its own, as in the reference.
    """
    at, eps, step_size, num_steps = cfg.at, cfg.eps, cfg.step_size, cfg.num_steps
    if at == "trades":
        with torch.no_grad(), eval_mode(model), attack_precision(x):  # the attack's target, in float32 as it
            target = model(x)
        x_adv = pgd_attack(model, x, trades_kl_loss_fn(target), eps=eps, step_size=step_size,
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

"""Conventional adversarial training steps (dense models, and MoE router and experts together), and the pieces
every training step shares: its settings (`StepConfig`) and its robust loss (`training_loss`).

AdvMoE's alternating steps are in `utils.advmoe`; how a step moves the weights (backward, clipping, optimizer) is
in `utils.update`; load balancing (a loss term, and the router upkeep that follows every router update) is in
`utils.balance`.
"""
from dataclasses import dataclass

from models.spec import is_moe
from .balance import DEFAULT_STRENGTH, RouterUpkeep, add_balance_term, loss_balancing
from .losses import robust_loss
from .update import StepContext, apply_update, check_finite


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


def training_loss(model, x, y, cfg: StepConfig, generator=None):
    """The robust loss of a training step (`cfg.at`: TRADES, PGD-AT or fast AT; `utils.losses.robust_loss`); for an
    MoE the dict also holds `router_logits`, for a load-balancing loss."""
    return robust_loss(model, x, y, cfg, generator)


def joint_step(model, x, y, cfg: StepConfig, ctx: StepContext, upkeep: RouterUpkeep | None = None):
    """Conventional adversarial training of the whole model (dense, or MoE router and experts together) with
    `ctx.optimizer`; the gradient norm is clipped at `cfg.grad_clip` (a dense model: all its parameters; an MoE:
    the backbone, and the router on its own at `cfg.router_grad_clip`, as in AdvMoE's two steps). For an MoE,
    the load-balancing loss of `cfg.balance` (if any) joins the loss, and `upkeep` follows the update (not in
    the paper, as in AdvMoE). Returns the loss dict."""
    out = training_loss(model, x, y, cfg, ctx.generator)
    moe = is_moe(model)
    balance = loss_balancing(cfg, model.n_expert) if moe else None
    if balance is not None:
        add_balance_term(out, balance)
    check_finite(out["loss"], "training loss", ctx.average)
    if moe:
        clips = [(model.router_parameters(), cfg.router_grad_clip), (model.backbone_parameters(), cfg.grad_clip)]
    else:
        clips = [(model.parameters(), cfg.grad_clip)]
    apply_update(ctx.optimizer, out["loss"], ctx, clips)
    if upkeep is not None:
        upkeep.after_router_update(model, x)
    return out

"""Conventional adversarial training steps (dense models, and MoE router and experts together), the settings
every training step shares (`StepConfig`), and the one builder of a step (`make_step`), used by training and by the
FLOP counter. The robust loss of every step is `utils.losses.robust_loss`.

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

    The defaults are the command line's (args.py) under `--advmoe-recipe paper`, so `StepConfig()` is the step
    of a dense run, of joint MoE training and of the paper's AdvMoE (a plain AdvMoE run defaults to `released`);
    a run builds its settings with `from_args`; `router_groups` (`--router-targets partition`) comes from the
    training data (`utils.advmoe.class_partition`), filled in by the run.
    """
    at: str = "trades"
    eps: float = 8 / 255
    step_size: float = 5 / 255
    num_steps: int = 2
    beta: float = 6.0
    alpha: float = 6.0
    router_objective: str = "robust"
    advmoe_order: str = "router-first"
    attack_router_kl: str = "none"  # which AdvMoE attacks add the router's KL: none, router-step, both
    router_at: float = 0.0
    flip_expert_at: float = 0.0
    router_groups: tuple | None = None  # class -> expert of the router's supervised terms (None: class mod N)
    balance: str = "median"
    balance_strength: float = DEFAULT_STRENGTH["median"]
    router_grad_clip: float = 1.0
    grad_clip: float = 1.0

    @classmethod
    def from_args(cls, args):
        """The step settings of a run, from its parsed flags (every one of them must be there)."""
        return cls(at=args.at, eps=args.epsilon, step_size=args.step_size, num_steps=args.num_steps,
                   beta=args.beta, alpha=args.alpha, router_objective=args.router_objective,
                   advmoe_order=args.advmoe_order, attack_router_kl=args.attack_router_kl, router_at=args.router_at,
                   flip_expert_at=args.flip_expert_at,
                   balance=args.balance, balance_strength=args.balance_strength,
                   router_grad_clip=args.router_grad_clip, grad_clip=args.grad_clip)


def joint_step(model, x, y, cfg: StepConfig, ctx: StepContext, upkeep: RouterUpkeep | None = None):
    """Conventional adversarial training of the whole model (dense, or MoE router and experts together) with
    `ctx.optimizer`; the gradient norm is clipped at `cfg.grad_clip` (a dense model: all its parameters; an MoE:
    the backbone, and the router on its own at `cfg.router_grad_clip`, as in AdvMoE's two steps). For an MoE,
    the load-balancing loss of `cfg.balance` (if any) joins the loss, and `upkeep` follows the update (not in
    the paper, as in AdvMoE). Returns the loss dict."""
    out = robust_loss(model, x, y, cfg, ctx.generator)
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


STEP_KINDS = ("advmoe", "joint", "dense")


def make_step(model, cfg: StepConfig, ctx: StepContext, kind: str, upkeep: RouterUpkeep | None = None):
    """The per-batch update of `model`, `step(x, y) -> loss dict`, as training (`utils.train.make_step`) and the
    FLOP counter (`utils.flops.make_train_step`) both run it.

    kind: 'advmoe' (AdvMoE's router step then expert step, `utils.advmoe.advmoe_step`; `ctx` holds both
    optimizers), 'joint' (one update of every parameter of an MoE, `joint_step`) or 'dense' (the same step for a
    dense model). upkeep: the router upkeep that follows each router update (None: none).
    """
    from .advmoe import advmoe_step  # advmoe builds on this module's StepConfig
    if kind == "advmoe":
        return lambda x, y: advmoe_step(model, x, y, cfg, ctx, upkeep=upkeep)
    if kind in ("joint", "dense"):
        return lambda x, y: joint_step(model, x, y, cfg, ctx, upkeep=upkeep)
    raise ValueError(f"unknown training step kind {kind!r} ({', '.join(STEP_KINDS)})")

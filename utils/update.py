"""How a training step changes the weights: gradients, clipping, the optimizer step, and the guards around it.

Shared by every step (`utils.steps.joint_step`, `utils.advmoe`'s router and expert steps), which only say what
loss to lower and which parameters move.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class NonFiniteError(RuntimeError):
    """A loss or the router went NaN/inf: training stops before anything bad is saved."""


@dataclass
class StepContext:
    """What a step updates with, as opposed to what it computes (`StepConfig`).

    optimizer: the backbone's (AdvMoE) or every parameter's (dense and joint training).
    router_optimizer: the router's own (AdvMoE), else None.
    scaler: a GradScaler for fp16 autocast, or None.
    generator: the attacks' random starts (None: torch's global RNG).
    grad_sync: `grad_sync(params)` averages gradients over processes (distributed runs), or None.
    average: `average(tensor)` averages a tensor over processes (distributed runs), or None.
    """
    optimizer: torch.optim.Optimizer | None = None
    router_optimizer: torch.optim.Optimizer | None = None
    scaler: object = None
    generator: torch.Generator | None = None
    grad_sync: Callable | None = None
    average: Callable | None = None


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


def apply_update(optimizer, loss, ctx: StepContext, clips=()):
    """Backward `loss` and step `optimizer`. In between: `ctx.grad_sync(params)` (distributed gradient averaging),
    then gradient-norm clipping: `clips` is a sequence of (params, max_norm), each group clipped on its own
    (max_norm 0: that group is not clipped)."""
    scaler = ctx.scaler
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if ctx.grad_sync is not None:
        ctx.grad_sync(params)
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

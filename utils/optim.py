"""Optimizers and per-epoch learning-rate schedules of a training run."""
import math

import torch

from .errors import UsageError


def make_optimizer(params, name, lr, momentum, wd):
    """SGD (momentum, weight decay, no Nesterov) or Adam over the trainable `params`."""
    params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=False)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    raise UsageError(f"unknown optimizer {name!r} (sgd, adam)")


def make_scheduler(optimizer, schedule, epochs):
    """Per-epoch schedule: cosine to 0, or step (x0.1 at 75% and again at 90% of the epochs)."""
    if schedule == "cosine":
        fn = lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs))  # noqa: E731
    elif schedule == "step":
        fn = lambda e: 0.1 ** ((e >= 0.75 * epochs) + (e >= 0.9 * epochs))  # noqa: E731
    else:
        raise UsageError(f"unknown lr schedule {schedule!r} (cosine, step)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def build_optimizers(args, model, kind):
    """(optimizer, scheduler, router_optimizer, router_scheduler) of a run whose update is `kind`: AdvMoE trains
    the backbone and the router with optimizers of their own (`--router-optimizer`, `--router-lr`,
    `--router-lr-schedule`); dense and joint training have one optimizer over every parameter (router: None)."""
    router_optimizer = router_scheduler = None
    if kind == "advmoe":
        optimizer = make_optimizer(model.backbone_parameters(), args.optimizer, args.lr, args.momentum, args.wd)
        router_optimizer = make_optimizer(model.router_parameters(), args.router_optimizer, args.router_lr,
                                          args.momentum, args.wd)
        router_scheduler = make_scheduler(router_optimizer, args.router_lr_schedule, args.epochs)
    else:
        optimizer = make_optimizer(model.parameters(), args.optimizer, args.lr, args.momentum, args.wd)
    return optimizer, make_scheduler(optimizer, args.lr_schedule, args.epochs), router_optimizer, router_scheduler

"""Expert load balancing and router upkeep, neither in the paper: BatchNorm statistics that follow the router,
and `--balance`, `--balance-strength` (a loss term in the router's loss, or an adjustment after each router update).

Balancing modes (one flag, for global and per-layer routing alike):
- `bias`: a selection-only bias per expert (`models.layers.router.BalanceState`), added to the logits
  for the `argmax` only, never to the gate's probabilities, moved after each router update by `strength` times
  the shift that would balance the measured images (a proportional controller).
- `bias-sign`: the same bias moved by a fixed step (`strength`) towards equal load, from a running estimate of
  the load (auxiliary-loss-free balancing as in DeepSeek-V3).
  Both measure the load on training images *without augmentation*, as evaluation sees them.
- `switch`: the Switch-Transformer loss N * sum_e f_e P_e (1 when balanced), times `strength`, in the router's loss.
- `entropy`: log N - H(mean router probabilities) (0 when balanced), times `strength`, in the router's loss.
- `median` (default): the output bias of the router is re-centred on the median logit margin of the measured images
  after each update (`strength` is the fraction of that shift applied; 1: the whole shift).
- `none`: no balancing (the released code).
Every mode starts from the same data-dependent router initialisation (`init_router`).
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.layers.router import selection_scores
from models.spec import is_moe

BALANCE_MODES = ("bias", "bias-sign", "switch", "entropy", "median", "none")
# Defaults of --balance-strength per mode. The default mode is `median` with the whole shift (1): the README's
# "Why `median` is the default" shows the smaller steps of `bias` and `bias-sign` falling behind the router.
DEFAULT_STRENGTH = {"bias": 0.5, "bias-sign": 0.02, "switch": 0.01, "entropy": 0.1, "median": 1.0, "none": 0.0}
LOSS_MODES = ("switch", "entropy")
LOAD_MOMENTUM = 0.1  # weight of the newest measurement in the running load estimate


def switch_loss(router_logits, n_expert):
    """Switch-Transformer load balancing, N * sum_e f_e * P_e: 1 when balanced, N when one expert takes all.

    f_e is the share of images routed to e (no gradient), P_e the mean router probability of e; the
    gradient lowers the probabilities of overloaded experts. `router_logits` (B, N) or a list of them
    (layer routing, averaged).
    """
    if isinstance(router_logits, (list, tuple)):
        return sum(switch_loss(lg, n_expert) for lg in router_logits) / len(router_logits)
    probs = F.softmax(router_logits.float(), dim=1)  # (B, N)
    share = F.one_hot(router_logits.argmax(1), n_expert).float().mean(0)  # (N,)
    return n_expert * (share * probs.mean(0)).sum()


def entropy_loss(router_logits, n_expert):
    """log N - H(mean router probability over the batch): 0 when the experts get equal mean probability, log N
    when one expert takes it all. `router_logits` (B, N) or a list of them (averaged)."""
    if isinstance(router_logits, (list, tuple)):
        return sum(entropy_loss(lg, n_expert) for lg in router_logits) / len(router_logits)
    mean = F.softmax(router_logits.float(), dim=1).mean(0)  # (N,)
    return math.log(n_expert) + (mean * torch.log(mean.clamp(min=1e-12))).sum()


def balance_loss(mode, router_logits, n_expert):
    """The loss-based balancing term of `mode` (`switch` or `entropy`)."""
    return {"switch": switch_loss, "entropy": entropy_loss}[mode](router_logits, n_expert)


def loss_balancing(cfg, n_expert):
    """The load-balancing loss term of `--balance switch|entropy`, a function of the router logits
    (`cfg.balance_strength` x `balance_loss`), for a step whose settings are `cfg` (a `utils.steps.StepConfig`);
    None for every other mode."""
    if cfg.balance not in LOSS_MODES or cfg.balance_strength <= 0:
        return None
    return lambda router_logits: cfg.balance_strength * balance_loss(cfg.balance, router_logits, n_expert)


def add_balance_term(out, balance):
    """`out["loss"]` plus `balance(out["router_logits"])`, recorded as `out["balance_loss"]` (in place)."""
    out["balance_loss"] = balance(out["router_logits"])
    out["loss"] = out["loss"] + out["balance_loss"]
    return out


@contextmanager
def captured_router_logits(model):
    """Record every router's output during forwards in this block: yields a dict router -> list of (B, N)."""
    captured = {}
    hooks = [r.register_forward_hook(lambda m, inp, out: captured.setdefault(m, []).append(out))
             for r in model.routers()]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def router_logits_on(model, x):
    """[(router, logits (B, N))] of every router on images `x` in [0,1], as evaluation routes them (eval mode;
    per-layer routers in forward order, each seeing the features its earlier layers' choices produce)."""
    was_training = model.training
    model.eval()
    try:
        if model.routing_mode == "global":
            return [(model.router, model.route(x))]
        with captured_router_logits(model) as captured:
            model(x)
        return [(r, outs[0]) for r, outs in captured.items()]  # dicts keep insertion (forward) order
    finally:
        model.train(was_training)


def _median_shift(logits):
    """Per expert, the median over images of its logit minus the image's mean logit: (N,)."""
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)).median(dim=0).values


@torch.no_grad()
def center_router_bias(router, logits, fraction=1.0, average=None):
    """Shift `router`'s output bias so that every expert's median logit margin over the images behind `logits`
    (B, N) moves `fraction` of the way to zero (with 2 experts and fraction 1: half the images on each side).
    `average(tensor)` averages the shift over processes (distributed runs keep one router)."""
    shift = _median_shift(logits)
    if average is not None:
        shift = average(shift)
    router.fc.bias -= (fraction * shift).to(router.fc.bias.dtype)


@torch.no_grad()
def step_select_bias(router, logits, step, average=None, sign=False):
    """Move `router`'s selection-only bias towards equal load on the images behind `logits` (B, N, raw).

    `--balance bias`: by `step` times the shift that would balance these images (each expert's median margin of
    selection score over the mean to zero), a proportional controller in logit units. `--balance bias-sign`
    (DeepSeek-V3's rule): by a fixed `step` in the direction of equal load, from a running estimate of the load
    (`load_ema`). Both keep `load_ema` up to date (reported per epoch).
    """
    state = router.balance
    n = state.select_bias.numel()
    scores = selection_scores(logits, state.select_bias)
    load = F.one_hot(scores.argmax(1), n).float().mean(0)  # (N,)
    if average is not None:
        load = average(load)
    state.load_ema.mul_(1 - LOAD_MOMENTUM).add_(LOAD_MOMENTUM * load.to(state.load_ema.dtype))
    if sign:
        state.select_bias.add_(step * torch.sign(1.0 / n - state.load_ema))
        return
    shift = _median_shift(scores)
    if average is not None:
        shift = average(shift)
    state.select_bias.sub_(step * shift.to(state.select_bias.dtype))


def _router_batchnorms(model):
    return [m for m in model.router.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


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
    if average is not None:  # one all-reduce for all of them, not two per BatchNorm
        buffers = [b for bn in bns for b in (bn.running_mean, bn.running_var)]
        averaged = average(torch.cat([b.flatten() for b in buffers]))
        for b, value in zip(buffers, averaged.split([b.numel() for b in buffers])):
            b.copy_(value.view_as(b))


@torch.no_grad()
def init_router(model, x):
    """Data-dependent start of a fresh MoE on training images `x` (every balancing mode): the global router's
    BatchNorm running statistics from `x`, then every router's output bias centred on `x`.

    A freshly initialised router sends nearly every image to one expert (the logits are dominated by a
    component shared by all images), and the straight-through gradient then only ever sees that expert.
    """
    if not is_moe(model) or model.n_expert < 2:
        return
    if model.routing_mode == "global":
        calibrate_router_statistics(model, x)
    for layer in range(len(model.routers())):  # per-layer routers one at a time: each changes what later ones see
        router, logits = router_logits_on(model, x)[layer]
        center_router_bias(router, logits)


@torch.no_grad()
def cap_logit_scale(router, logits, cap, average=None):
    """Scale `router`'s output layer and selection bias down by one factor when the median top-1 minus top-2
    margin of its raw logits (B, N) exceeds `cap`, so that it equals `cap`. Every decision stays the same
    (argmax is invariant to a positive factor); the softmax that carries the straight-through gradient stays out
    of saturation. `average(tensor)` averages the margin over processes. Returns the factor applied (1: none)."""
    top = logits.float().topk(2, dim=1).values  # (B, 2)
    margin = (top[:, 0] - top[:, 1]).median()
    if average is not None:
        margin = average(margin)
    if not margin > cap:
        return 1.0
    factor = (cap / margin).item()
    router.fc.weight.mul_(factor)
    router.fc.bias.mul_(factor)
    router.balance.select_bias.mul_(factor)
    return factor


@dataclass
class RouterUpkeep:
    """What runs after every router update, besides the paper's algorithm: the global router's BatchNorm
    statistics follow it (on the training batch); then, on images as evaluation sees them, the router's logit
    scale is capped (`logit_cap` > 0, `cap_logit_scale`) and `mode` balancing acts.

    probe: training images without augmentation (P, C, H, W) on the model's device, `probe_batch` of them drawn
    at random (torch's global RNG, so a resumed run draws the same) after each update; None: the training batch
    itself. average: averages a tensor over processes, or None.
    """
    mode: str = "median"
    strength: float = DEFAULT_STRENGTH["median"]
    logit_cap: float = 0.0
    probe: torch.Tensor | None = None
    probe_batch: int = 64
    average: Callable | None = None

    def _images(self, x):
        if self.probe is None or not len(self.probe):
            return x
        return self.probe[torch.randint(len(self.probe), (self.probe_batch,)).to(self.probe.device)]

    def after_router_update(self, model, x):
        """Both of the upkeep's parts, after a router update on the training batch `x`."""
        self.track_statistics(model, x)
        self.balance(model, x)

    @torch.no_grad()
    def track_statistics(self, model, x):
        """The global router's BatchNorm running statistics follow its update (on the training batch `x`)."""
        if is_moe(model) and model.routing_mode == "global":
            track_router_statistics(model, x, self.average)

    @torch.no_grad()
    def balance(self, model, x):
        """Cap the routers' logit scale and balance their load (`mode`), measured on the probe images (else `x`)."""
        if not is_moe(model):
            return
        balancing = self.mode in ("bias", "bias-sign", "median") and self.strength > 0
        if model.n_expert < 2 or not (balancing or self.logit_cap > 0):
            return
        for router, logits in router_logits_on(model, self._images(x)):
            if self.logit_cap > 0:
                logits = logits * cap_logit_scale(router, logits, self.logit_cap, self.average)
            if self.mode in ("bias", "bias-sign"):
                step_select_bias(router, logits, self.strength, self.average, sign=self.mode == "bias-sign")
            elif self.mode == "median":
                center_router_bias(router, logits, self.strength, self.average)

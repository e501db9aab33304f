"""Base of every model: input normalisation, the optional router, and routing plumbing.

A family (ResNet, WRN, VGG, DenseNet) subclasses `RoutedNet`, builds its layers with `self.conv(...)`
(an `nn.Conv2d` or, where the family routes, a `MoEConv2d`), calls `self.finish()` last in `__init__`
(so the router's parameters come last in the state dict, as in the reference), and implements
`forward_features(x, routing)` calling MoE convs through `call(conv, x, routing)`. A family's constructor takes
the model's `ModelSpec` (validated by `models.build_model`) and its own layout; it initialises with
`init_weights`. Whether a module or a parameter belongs to a router is answered here only (`routers`,
`router_modules`, `backbone_modules`).
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import (LayerRouter, MoEConv2d, Normalize, Router, Routing, expert_groups, hard_top1, selection_scores,
                     top_k_gates)
from .spec import ModelSpec


def call(layer: nn.Module, x: torch.Tensor, routing: Routing | None):
    """Apply a layer that may be an MoE conv (needs the routing) or a plain module."""
    return layer(x, routing) if isinstance(layer, MoEConv2d) else layer(x)


def require_channels(ratio: float, widths: dict):
    """ValueError (a usage error upstream) when `ratio` leaves a layer without channels.

    widths: {layer name: base width}; every width becomes int(ratio * width), so the narrowest one decides.
    """
    layer, width = min(widths.items(), key=lambda item: item[1])
    if int(ratio * width) < 1:
        raise ValueError(f"--ratio {ratio:g} leaves {layer} without channels (int({ratio:g} * {width}) = 0): "
                         f"this arch needs --ratio 1/{width} ({1 / width:.4g}) or more")


def routers(model: nn.Module) -> list[nn.Module]:
    """The router networks of `model`: its global router or its per-layer routers (none for a dense model)."""
    return [m for m in model.modules() if isinstance(m, (Router, LayerRouter))]


def router_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that is part of a router (the routers and their layers): the one answer to "is this module
    the router's?"."""
    return [m for r in routers(model) for m in r.modules()]


def backbone_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of `model` that is not part of a router (the model itself included)."""
    inside = {id(m) for m in router_modules(model)}
    return [m for m in model.modules() if id(m) not in inside]


def init_weights(model: nn.Module):
    """Kaiming-normal (fan-out, ReLU) convs, per expert for MoE convs; BatchNorm to the identity.

    Routers (global or per-layer) are left to their own initialisation.
    """
    for m in backbone_modules(model):
        if isinstance(m, (nn.Conv2d, MoEConv2d)):
            fan_out = m.out_channels * m.weight.shape[-2] * m.weight.shape[-1]  # MoE: one expert's rows
            with torch.no_grad():
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass
class RoutingInfo:
    """What the routing did in one forward, in the caller's batch order.

    Global routing: `logits` (B, N) (None when the experts were fixed by the caller) and `expert` (B,).
    Layer routing: `logits` and `expert` are lists with one entry per MoE layer.
    Top-k routing (k >= 2): `expert` (B, k) and `gate` (B, k), the experts' weights (lists for layer routing).
    """
    logits: torch.Tensor | list | None
    expert: torch.Tensor | list
    gate: torch.Tensor | list | None = None


class RoutedNet(nn.Module):
    """Dense model when `spec.n_expert` is None, MoE-CNN otherwise; `spec` is a validated `ModelSpec`."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.normalize)
        self.n_expert = spec.n_expert
        self.routing_mode = spec.routing if spec.n_expert else None
        self.sparse = spec.sparse
        # Stages (1-based) whose convs are MoE convs; None: every stage (the reference's layout).
        self.moe_stages = spec.moe_stages
        self.top_k = spec.top_k

    @property
    def is_moe(self) -> bool:
        return self.n_expert is not None

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False, moe=True):
        """A conv layer: MoE (out_channels per expert) in an MoE model when `moe`, else dense."""
        if self.is_moe and moe:
            return MoEConv2d(in_channels, out_channels, kernel_size, stride, padding, bias,
                             n_expert=self.n_expert, layer_router=self.routing_mode == "layer")
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)

    def stage_conv(self, stage: int, n_stages: int):
        """The conv factory of stage `stage` (1-based, of `n_stages`): `self.conv`, except that convs of a stage
        outside `moe_stages` are dense. A dense conv has the same output width as the MoE conv it replaces
        (`out_channels`, one expert's width), so dense and MoE stages fit together at any ratio."""
        if self.moe_stages is not None and not set(self.moe_stages) <= set(range(1, n_stages + 1)):
            raise ValueError(f"moe_stages {list(self.moe_stages)}: this arch has stages 1..{n_stages}")
        holds_moe = self.moe_stages is None or stage in self.moe_stages

        def conv(*args, moe=True, **kwargs):
            return self.conv(*args, moe=moe and holds_moe, **kwargs)
        conv.holds_moe = holds_moe
        return conv

    def finish(self):
        """Attach the global router last, so state-dict order matches the reference."""
        self.router = Router(self.n_expert) if self.routing_mode == "global" else None

    def forward_features(self, x, routing):  # pragma: no cover - implemented by each family
        raise NotImplementedError

    def route(self, x):
        """Global router logits (B, N) for [0,1] images."""
        if self.routing_mode != "global":
            raise RuntimeError("route() needs global routing")
        return self.router(self.normalize(x))

    def route_scores(self, x):
        """Global routing scores (B, N) for [0,1] images: the router logits plus its selection-only bias, whose
        argmax is the decision (what a router attack must flip)."""
        return selection_scores(self.route(x), self.router.balance.select_bias)

    def routers(self):
        """The global router, or every per-layer router (in module order)."""
        return routers(self)

    def balance_state(self) -> dict:
        """The routers' load-balancing buffers (not in the state dict, which keeps the reference's layout)."""
        return {name: b.detach().clone() for name, b in self.named_buffers() if ".balance." in f".{name}"}

    def load_balance_state(self, state: dict):
        """Restore `balance_state()`; names it does not hold are a KeyError, shapes must match."""
        own = dict(self.named_buffers())
        with torch.no_grad():
            for name, value in state.items():
                if ".balance." not in f".{name}" or own[name].shape != value.shape:
                    raise KeyError(name)
                own[name].copy_(value)

    def router_parameters(self):
        """Parameters of the router(s): the global router or every per-layer router."""
        return [p for m in self.routers() for p in m.parameters()]

    def backbone_parameters(self):
        """Every parameter that is not a router's (the experts and the shared layers)."""
        routers = {id(p) for p in self.router_parameters()}
        return [p for p in self.parameters() if id(p) not in routers]

    def forward(self, x, expert=None, return_routing=False, gate=None):
        """Logits (B, classes) for images x in [0,1].

        Args:
            expert: fix the routing instead of asking the router: a (B,) long tensor of experts
                (global routing) or a list of them, one per MoE layer (layer routing). No gradient
                then reaches the router. With top-k routing, (B, k) experts with their `gate` weights (B, k)
                (or lists of them); a (B,) expert sends each image through that one expert alone.
            return_routing: also return a `RoutingInfo`.
        """
        x = self.normalize(x)
        if not self.is_moe:
            out = self.forward_features(x, None)
            return (out, None) if return_routing else out
        if self.routing_mode == "layer":
            routing = Routing(self.n_expert, self.sparse, fixed_layers=expert, top_k=self.top_k, fixed_gates=gate)
            out = self.forward_features(x, routing)
            info = RoutingInfo(routing.layer_logits or None, routing.layer_experts, routing.layer_gates or gate)
            return (out, info) if return_routing else out
        if expert is None:
            logits = self.router(x)
            bias = self.router.balance.select_bias
            expert, gate = hard_top1(logits, bias) if self.top_k == 1 else top_k_gates(logits, self.top_k, bias)
        else:
            logits, gate = None, gate if expert.dim() == 2 else None
        if expert.dim() == 2:  # top-k, k >= 2: every MoE layer groups the (image, expert) pairs itself
            out = self.forward_features(x, Routing(self.n_expert, self.sparse, expert, gate))
            return (out, RoutingInfo(logits, expert, gate)) if return_routing else out
        if self.sparse and x.shape[0] > 0:
            # Global routing: sort the batch by expert once, so every MoE layer runs each expert on a
            # contiguous run of images with a contiguous slice of its weight (no copies).
            perm, groups = expert_groups(expert, self.n_expert)
            routing = Routing(self.n_expert, True, expert[perm], None if gate is None else gate[perm], groups)
            out = self.forward_features(x[perm], routing)[torch.argsort(perm)]
        else:
            out = self.forward_features(x, Routing(self.n_expert, self.sparse, expert, gate))
        return (out, RoutingInfo(logits, expert)) if return_routing else out

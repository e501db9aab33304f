"""Base of every model: input normalisation, the optional router, and routing plumbing.

A family (ResNet, WRN, VGG, DenseNet) subclasses `RoutedNet`, builds its layers with `self.conv(...)`
(an `nn.Conv2d` or, where the family routes, a `MoEConv2d`), calls `self.finish()` last in `__init__`
(so the router's parameters come last in the state dict, as in the reference), and implements
`forward_features(x, routing)` calling MoE convs through `call(conv, x, routing)`.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .layers import LayerRouter, MoEConv2d, Normalize, Router, Routing, expert_groups, hard_top1


def call(layer: nn.Module, x: torch.Tensor, routing: Routing | None):
    """Apply a layer that may be an MoE conv (needs the routing) or a plain module."""
    return layer(x, routing) if isinstance(layer, MoEConv2d) else layer(x)


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


@dataclass
class RoutingInfo:
    """What the routing did in one forward, in the caller's batch order.

    Global routing: `logits` (B, N) (None when the experts were fixed by the caller) and `expert` (B,).
    Layer routing: `logits` and `expert` are lists with one entry per MoE layer.
    """
    logits: torch.Tensor | list | None
    expert: torch.Tensor | list


class RoutedNet(nn.Module):
    """Dense model when `n_expert` is None, MoE-CNN otherwise."""

    def __init__(self, normalize=None, n_expert=None, routing="global", sparse=True):
        super().__init__()
        self.normalize = Normalize(normalize)
        self.n_expert = n_expert
        self.routing_mode = routing if n_expert else None
        self.sparse = sparse

    @property
    def is_moe(self) -> bool:
        return self.n_expert is not None

    def conv(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False, moe=True):
        """A conv layer: MoE (out_channels per expert) in an MoE model when `moe`, else dense."""
        if self.is_moe and moe:
            return MoEConv2d(in_channels, out_channels, kernel_size, stride, padding, bias,
                             n_expert=self.n_expert, layer_router=self.routing_mode == "layer")
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)

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

    def router_parameters(self):
        """Parameters of the router(s): the global router or every per-layer router."""
        return [p for r in routers(self) for p in r.parameters()]

    def backbone_parameters(self):
        """Every parameter that is not a router's (the experts and the shared layers)."""
        routers = {id(p) for p in self.router_parameters()}
        return [p for p in self.parameters() if id(p) not in routers]

    def forward(self, x, expert=None, return_routing=False):
        """Logits (B, classes) for images x in [0,1].

        Args:
            expert: fix the routing instead of asking the router: a (B,) long tensor of experts
                (global routing) or a list of them, one per MoE layer (layer routing). No gradient
                then reaches the router.
            return_routing: also return a `RoutingInfo`.
        """
        x = self.normalize(x)
        if not self.is_moe:
            out = self.forward_features(x, None)
            return (out, None) if return_routing else out
        if self.routing_mode == "layer":
            routing = Routing(self.n_expert, self.sparse, fixed_layers=expert)
            out = self.forward_features(x, routing)
            info = RoutingInfo(routing.layer_logits or None, routing.layer_experts)
            return (out, info) if return_routing else out
        if expert is None:
            logits = self.router(x)
            expert, gate = hard_top1(logits)
        else:
            logits, gate = None, None
        if self.sparse and x.shape[0] > 0:
            # Global routing: sort the batch by expert once, so every MoE layer runs each expert on a
            # contiguous run of images with a contiguous slice of its weight (no copies).
            perm, groups = expert_groups(expert, self.n_expert)
            routing = Routing(self.n_expert, True, expert[perm], None if gate is None else gate[perm], groups)
            out = self.forward_features(x[perm], routing)[torch.argsort(perm)]
        else:
            out = self.forward_features(x, Routing(self.n_expert, self.sparse, expert, gate))
        return (out, RoutingInfo(logits, expert)) if return_routing else out

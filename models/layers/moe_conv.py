"""The MoE convolution and the per-forward routing value handed to it."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .router import LayerRouter, hard_top1, top_k_gates


def expert_groups(expert: torch.Tensor, n_expert: int):
    """Sort a batch by expert: returns (perm, groups) with groups = [(start, stop, e), ...] of non-empty runs.

    One host-device sync (the counts' `tolist`): on CUDA `bincount` would add its own (it reads the maximum
    to size its output), so the counts are a fixed-size scatter-add instead.
    """
    perm = torch.argsort(expert, stable=True)
    counts = torch.zeros(n_expert, dtype=torch.long, device=expert.device)
    counts = counts.scatter_add_(0, expert, torch.ones_like(expert)).tolist()
    groups, start = [], 0
    for e, c in enumerate(counts):
        if c:
            groups.append((start, start + c, e))
            start += c
    return perm, groups


class Routing:
    """Routing decisions of one forward pass, passed explicitly to every MoE layer.

    Global routing: `expert` (B,), `gate` (B,) or None and, when the batch was sorted by expert, `groups`.
    Layer routing: each layer's own router decides; its logits and choices are appended to
    `layer_logits` / `layer_experts` in forward order, or taken from `fixed_layers` when given.
    Top-k routing (`top_k` >= 2): `expert` and `gate` are (B, k), each image's k experts and their weights;
    layer routing records each layer's gates in `layer_gates` and takes fixed ones from `fixed_gates`.
    """

    def __init__(self, n_expert: int, sparse: bool, expert=None, gate=None, groups=None, fixed_layers=None,
                 top_k=1, fixed_gates=None):
        self.n_expert, self.sparse = n_expert, sparse
        self.expert, self.gate, self.groups = expert, gate, groups
        self.fixed_layers = fixed_layers
        self.top_k, self.fixed_gates = top_k, fixed_gates
        self.layer_logits: list[torch.Tensor] = []
        self.layer_experts: list[torch.Tensor] = []
        self.layer_gates: list[torch.Tensor] = []

    def for_layer(self, layer: "MoEConv2d", x: torch.Tensor):
        """(expert, gate, groups) for `layer` on input `x`."""
        if self.expert is not None:
            return self.expert, self.gate, self.groups
        if self.fixed_layers is not None:
            i = len(self.layer_experts)
            expert = self.fixed_layers[i]
            self.layer_experts.append(expert)
            return expert, None if self.fixed_gates is None else self.fixed_gates[i], None
        if layer.router is None:
            raise RuntimeError("layer routing needs MoE layers built with a layer router")
        logits = layer.router(x)
        bias = layer.router.balance.select_bias
        expert, gate = hard_top1(logits, bias) if self.top_k == 1 else top_k_gates(logits, self.top_k, bias)
        self.layer_logits.append(logits)
        self.layer_experts.append(expert)
        if self.top_k > 1:
            self.layer_gates.append(gate)
        return expert, gate, None


class _UnitGate(torch.autograd.Function):
    """`y * gate.view(-1, 1, 1, 1)` for hard top-1 routing's straight-through gate, whose value is exactly 1
    (`hard_top1`), without its two full-size multiplications by 1: the forward is y itself, the backward hands
    the gradient to y unchanged and to the gate its per-image sum(grad * y), as the product's backward computes
    them (the same values, bit for bit)."""

    @staticmethod
    def forward(ctx, y, gate):
        ctx.save_for_backward(y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad, (grad * y).sum(dim=(1, 2, 3)) if ctx.needs_input_grad[1] else None


class MoEConv2d(nn.Module):
    """Conv whose `n_expert * out_channels` output rows are split among experts.

    Expert e owns weight rows e*w .. (e+1)*w-1 (w = out_channels), the reference layout; each image
    produces only its expert's w channels. Sparse mode convolves each image with its own expert's
    slice only; dense-masked mode (the reference's computation, kept as an oracle) convolves with all
    experts and keeps the chosen one through a one-hot mask. Under hard top-1 routing with a gate the output is a
    view made by a custom autograd function (`_UnitGate`): the layer after it must not modify it in place.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False,
                 n_expert=1, layer_router=False):
        super().__init__()
        self.in_channels, self.out_channels, self.n_expert = in_channels, out_channels, n_expert
        self.stride, self.padding = stride, padding
        k = kernel_size
        self.weight = nn.Parameter(torch.empty(n_expert * out_channels, in_channels, k, k))
        self.bias = nn.Parameter(torch.empty(n_expert * out_channels)) if bias else None
        self.router = LayerRouter(in_channels, n_expert) if layer_router else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default, per-expert fan-in
        if self.bias is not None:
            bound = 1 / math.sqrt(in_channels * k * k)
            nn.init.uniform_(self.bias, -bound, bound)

    def _expert_slice(self, e):
        rows = slice(e * self.out_channels, (e + 1) * self.out_channels)
        return self.weight[rows], (self.bias[rows] if self.bias is not None else None)

    def _conv(self, x, weight, bias):
        return F.conv2d(x, weight, bias, self.stride, self.padding)

    def _sparse(self, x, expert, groups):
        if groups is None:  # batch not sorted by expert (layer routing): sort here, undo after
            perm, groups = expert_groups(expert, self.n_expert)
            out = self._sparse(x[perm], None, groups)
            return out[torch.argsort(perm)]
        if not groups:  # empty batch
            return self._conv(x, *self._expert_slice(0))
        if len(groups) == 1:
            return self._conv(x, *self._expert_slice(groups[0][2]))
        # One split into the groups, not a slice per group: a slice's backward writes its gradient into a zeroed
        # tensor of the whole batch (one per group, then summed); the split's is one concatenation. Same values.
        parts = x.split([t - s for s, t, _ in groups])
        return torch.cat([self._conv(part, *self._expert_slice(e)) for part, (_, _, e) in zip(parts, groups)])

    def _dense_masked(self, x, expert):
        y = self._conv(x, self.weight, self.bias)  # (B, N*w, H, W): every expert computed
        y = y.view(y.shape[0], self.n_expert, self.out_channels, *y.shape[2:])
        mask = F.one_hot(expert, self.n_expert).to(y.dtype)[:, :, None, None, None]  # (B, N, 1, 1, 1)
        return (y * mask).sum(dim=1)  # (B, w, H, W)

    def _sparse_top_k(self, x, expert, gate):
        """Each image through each of its k experts (it appears in k expert groups), outputs summed with the gates."""
        b, k = expert.shape  # (B, k)
        image = torch.arange(b, device=x.device).repeat_interleave(k)  # (B*k,): the image of each (image, slot)
        perm, groups = expert_groups(expert.reshape(-1), self.n_expert)
        image = image[perm]
        y = self._sparse(x[image], None, groups)  # (B*k, w, H', W'), sorted by expert
        y = y * gate.reshape(-1)[perm].to(y.dtype).view(-1, 1, 1, 1)
        return y.new_zeros(b, *y.shape[1:]).index_add_(0, image, y)  # (B, w, H', W')

    def _dense_masked_top_k(self, x, expert, gate):
        y = self._conv(x, self.weight, self.bias)  # (B, N*w, H, W): every expert computed
        y = y.view(y.shape[0], self.n_expert, self.out_channels, *y.shape[2:])
        mask = torch.zeros(y.shape[:2], dtype=y.dtype, device=y.device).scatter(1, expert, gate.to(y.dtype))
        return (y * mask[:, :, None, None, None]).sum(dim=1)  # (B, w, H, W)

    def forward(self, x, routing: Routing):
        expert, gate, groups = routing.for_layer(self, x)
        if expert.dim() == 2:  # top-k routing, k >= 2: a weighted sum of k experts per image
            if gate is None:
                raise RuntimeError("top-k routing needs the gates of the fixed experts")
            return self._sparse_top_k(x, expert, gate) if routing.sparse else self._dense_masked_top_k(x, expert, gate)
        y = self._sparse(x, expert, groups) if routing.sparse else self._dense_masked(x, expert)
        if gate is None:
            return y
        gate = gate.to(y.dtype)  # the float32 gate must not promote a bf16 output
        if routing.fixed_gates is None:  # value 1 (hard_top1's): carries the straight-through gradient to the router
            return _UnitGate.apply(y, gate)
        return y * gate.view(-1, 1, 1, 1)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels} x {self.n_expert} experts, "
                f"kernel_size={self.weight.shape[-1]}, stride={self.stride}, padding={self.padding}")

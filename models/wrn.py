"""Wide ResNets WRN-28-4, WRN-28-10 and WRN-34-10, CIFAR and TinyImageNet variants, dense and MoE.

One class, `_WideResNet`, builds all twelve archs from their `ModelSpec`; a model is MoE when the spec has
experts. The
state-dict layout equals the reference's (see `reference/parameters/wrn_28_10_*`). Rules read off the
listings (w = int(ratio * width) everywhere):

WRN-d-k has three stages (`block1..3`, each holding `layer.0 .. layer.{n-1}`, n = (d - 4) / 6) of
pre-activation basic blocks of width 16k, 32k, 64k (strides 1, 2, 2) after a stem of width 16, all
scaled by r. A block is `bn1`, ReLU, `conv1` 3x3 (stride), `bn2`, ReLU, `conv2` 3x3, plus the
identity, or a 1x1 `convShortcut` (no BN) on the pre-activated input when the width or stride changes.
After the last stage: `bn1`, ReLU, global average pool, `fc`. No dropout (the reference uses rate 0).

CIFAR (`wrn_*_cifar_*`, 32x32): stem `conv1` 3x3 stride 1, no BN of its own (the first block's
    pre-activation normalises it).
TinyImageNet (`wrn_*_imagenet_*`, 64x64; any size >= 32 works thanks to adaptive pooling): stem `conv1`
    7x7 stride 2, `bn0`, ReLU, 3x3 stride-2 max-pool (64x64 -> 16x16 into block1).
MoE: the stem stays dense (scaled by r); every block conv and every `convShortcut` is an MoE conv;
    BatchNorms after MoE convs have w channels, shared by the experts; `fc` is shared.

Faithful to a quirk of the reference: its MoE WRN (not its dense one) feeds the raw block input, not the
`bn1`+ReLU pre-activated one, to `conv1` and `convShortcut` in the first block of every stage, leaving
that block's `bn1` unused (it stays in the state dict). Our MoE WRN does the same, so the authors'
checkpoints compute what they computed; the dense WRN is the standard pre-activation network.
The reference's dense TinyImageNet WRN gives `bn0` 16 channels whatever r, so it only runs at r = 1;
ours has int(16 r), the same layout at r = 1.

Initialisation as in `base.init_weights` (Kaiming-normal fan-out convs, per expert; identity BN).
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import RoutedNet, call, init_weights, require_channels
from .registry import register_variant
from .spec import ModelSpec


class _WideBlock(nn.Module):
    """Pre-activation basic block: (BN, ReLU, conv) twice, plus identity or a 1x1 projection."""

    def __init__(self, conv, in_planes, out_planes, stride, raw_projection_input=False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv(in_planes, out_planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = conv(out_planes, out_planes, 3, 1, 1)
        projects = stride != 1 or in_planes != out_planes
        self.convShortcut = conv(in_planes, out_planes, 1, stride, 0) if projects else None
        # The reference MoE WRN: a projecting block reads its raw input (bn1 unused), see module doc.
        self.raw_input = projects and raw_projection_input

    def forward(self, x, routing):
        act = x if self.raw_input else F.relu(self.bn1(x))
        out = call(self.conv1, act, routing)  # (B, w, H/stride, W/stride)
        out = call(self.conv2, F.relu(self.bn2(out)), routing)
        shortcut = x if self.convShortcut is None else call(self.convShortcut, act, routing)
        return out + shortcut


class _Stage(nn.Module):
    """`n` wide blocks; the first one changes width and carries the stride (`blockK.layer.J` names)."""

    def __init__(self, conv, n, in_planes, out_planes, stride, raw_projection_input=False):
        super().__init__()
        self.layer = nn.ModuleList(
            _WideBlock(conv, in_planes if j == 0 else out_planes, out_planes, stride if j == 0 else 1,
                       raw_projection_input)
            for j in range(n))

    def forward(self, x, routing):
        for block in self.layer:
            x = block(x, routing)
        return x


class _WideResNet(RoutedNet):
    """WRN-`depth`-`widen`; `stem` is 'cifar' (32x32) or 'imagenet' (TinyImageNet, 64x64)."""

    def __init__(self, spec: ModelSpec, depth, widen, stem):
        super().__init__(spec)
        ratio = spec.ratio
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        require_channels(ratio, {"conv1": 16, "block1": 16 * widen})
        widths = [int(ratio * c) for c in (16, 16 * widen, 32 * widen, 64 * widen)]
        if stem == "imagenet":
            self.conv1 = self.conv(3, widths[0], 7, stride=2, padding=3, moe=False)
            self.bn0 = nn.BatchNorm2d(widths[0])
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = self.conv(3, widths[0], 3, stride=1, padding=1, moe=False)
            self.bn0, self.maxpool = None, None
        # The reference's raw-input quirk belongs to its MoE blocks; a dense stage (--moe-stages) is standard.
        convs = [self.stage_conv(k, 3) for k in (1, 2, 3)]
        self.block1 = _Stage(convs[0], n, widths[0], widths[1], 1, convs[0].holds_moe and self.is_moe)
        self.block2 = _Stage(convs[1], n, widths[1], widths[2], 2, convs[1].holds_moe and self.is_moe)
        self.block3 = _Stage(convs[2], n, widths[2], widths[3], 2, convs[2].holds_moe and self.is_moe)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], spec.num_classes)
        init_weights(self)
        nn.init.zeros_(self.fc.bias)
        self.finish()

    def forward_features(self, x, routing):
        out = self.conv1(x)  # (B, w0, H, W); ImageNet stem: H/2
        if self.bn0 is not None:
            out = self.maxpool(F.relu(self.bn0(out)))  # (B, w0, H/4, W/4)
        for stage in (self.block1, self.block2, self.block3):
            out = stage(out, routing)  # (B, w_k, h, w) after the stage's stride
        out = F.relu(self.bn1(out))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # (B, w3)
        return self.fc(out)  # (B, classes)


# Each (depth, widen factor, stem) variant registered once, as `wrn_<depth>_<widen>_<stem>_ori` (dense) and `_moe`.
for _stem in ("cifar", "imagenet"):
    for _depth, _widen in ((28, 4), (28, 10), (34, 10)):
        register_variant(f"wrn_{_depth}_{_widen}_{_stem}", partial(_WideResNet, depth=_depth, widen=_widen, stem=_stem))

"""ResNet-18/34/50/101/152, CIFAR and ImageNet variants, dense (`*_ori`) and MoE (`*_moe`).

One class, `_ResNet`, builds all twenty archs from their `ModelSpec`; a model is MoE when the spec has experts.
The state-dict layout equals the reference's (see `reference/parameters/resnet18_*`), so its checkpoints load
with `strict=True`. Rules, read off the listings (w = int(ratio * width) everywhere):

Stage widths (planes) 64, 128, 256, 512 with strides 1, 2, 2, 2; a stage's blocks have
`int(ratio * planes)` channels, times the expansion (1 basic, 4 bottleneck) at the block output
(`int(ratio * planes) * 4`, the reference's rounding, so a bottleneck's output is 4x its inner width).
Blocks of stage i are `layer{i}.{j}`: basic = `conv1` 3x3 (stride), `bn1`, `conv2` 3x3, `bn2`;
bottleneck = `conv1` 1x1, `bn1`, `conv2` 3x3 (stride), `bn2`, `conv3` 1x1 (x4), `bn3`; then the
projection shortcut, if any (stride not 1 or width change; so every bottleneck net has one in layer1.0).
MoE layers run in registration order, so per-layer routing records choices in that order.

CIFAR (`*_cifar_*`, 32x32 input):
    stem `conv1` 3x3 stride 1 + `bn1`, no max-pool; classifier `linear`; projection shortcut named
    `shortcut.0` (1x1 conv) / `shortcut.1` (BatchNorm). Dense: the stem has int(64 r) channels.
    MoE: the stem keeps 64 channels (not scaled), every block conv is an MoE conv, and the shortcut
    convs stay dense. So at r < 1 the first block of layer1 has a dense 1x1 shortcut (64 -> int(64 r)).
ImageNet (`*_imagenet_*`, 224x224, or any size >= 32 thanks to adaptive pooling):
    stem `conv1` 7x7 stride 2 + `bn1` + 3x3 stride-2 max-pool, int(64 r) channels, always dense;
    classifier `fc`; shortcut named `downsample.0` / `downsample.1`. MoE: every block conv and every
    downsample conv is an MoE conv.
Both: the first conv of the network reads RGB and is dense; an MoE conv's input width is what the
previous layer produced per image (w, the chosen expert's channels); the BatchNorm after an MoE conv has
w channels, shared by all experts; global average pooling, then the classifier (dense, shared). The
global router (`router.*`) comes last in the state dict (`RoutedNet.finish`).

Initialisation: every conv (each expert on its own) Kaiming-normal with fan-out, BatchNorm weight 1 and
bias 0, the classifier PyTorch's default.
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import RoutedNet, call, init_weights, require_channels
from .registry import register_variant
from .spec import ModelSpec

_STAGE_PLANES = (64, 128, 256, 512)
_STAGE_STRIDES = (1, 2, 2, 2)


def _projection(conv, in_planes, out_planes, stride, moe):
    """1x1 conv + BN shortcut where the identity cannot be added (stride or width change), else None."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(conv(in_planes, out_planes, 1, stride, 0, moe=moe), nn.BatchNorm2d(out_planes))


class _Residual(nn.Module):
    """relu(residual(x) + shortcut(x)); the shortcut's key is 'shortcut' (CIFAR) or 'downsample' (ImageNet)."""

    def add_shortcut(self, name, projection):
        self.shortcut_name = name
        setattr(self, name, projection)  # registered after the residual branch: the reference's key order

    def forward(self, x, routing):
        out = self.residual(x, routing)
        # After the residual branch, so MoE layers run in registration order (per-layer routing records
        # its choices in call order).
        projection = getattr(self, self.shortcut_name)
        identity = x if projection is None else projection[1](call(projection[0], x, routing))
        return F.relu(out + identity)


class _BasicBlock(_Residual):
    """Two 3x3 convs, the first carrying the stride."""

    expansion = 1

    def __init__(self, conv, in_planes, planes, stride, shortcut_name, moe_shortcut):
        super().__init__()
        self.conv1 = conv(in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.add_shortcut(shortcut_name, _projection(conv, in_planes, planes, stride, moe_shortcut))

    def residual(self, x, routing):
        out = F.relu(self.bn1(call(self.conv1, x, routing)))  # (B, w, H/stride, W/stride)
        return self.bn2(call(self.conv2, out, routing))


class _Bottleneck(_Residual):
    """1x1 reduce, 3x3 carrying the stride, 1x1 expand by 4."""

    expansion = 4

    def __init__(self, conv, in_planes, planes, stride, shortcut_name, moe_shortcut):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = conv(in_planes, planes, 1, 1, 0)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv(planes, out_planes, 1, 1, 0)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.add_shortcut(shortcut_name, _projection(conv, in_planes, out_planes, stride, moe_shortcut))

    def residual(self, x, routing):
        out = F.relu(self.bn1(call(self.conv1, x, routing)))  # (B, w, H, W)
        out = F.relu(self.bn2(call(self.conv2, out, routing)))  # (B, w, H/stride, W/stride)
        return self.bn3(call(self.conv3, out, routing))  # (B, 4w, H/stride, W/stride)


class _ResNet(RoutedNet):
    """ResNet over `block` with `depths` blocks per stage; `stem` is 'cifar' or 'imagenet'."""

    def __init__(self, spec: ModelSpec, block, depths, stem):
        super().__init__(spec)
        ratio = spec.ratio
        imagenet = stem == "imagenet"
        require_channels(ratio, {"layer1": _STAGE_PLANES[0]})
        # The reference's CIFAR MoE keeps a full 64-channel stem; every other variant scales it.
        stem_width = 64 if (self.is_moe and not imagenet) else int(ratio * 64)
        if imagenet:
            self.conv1 = self.conv(3, stem_width, 7, stride=2, padding=3, moe=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = self.conv(3, stem_width, 3, stride=1, padding=1, moe=False)
            self.maxpool = None
        self.bn1 = nn.BatchNorm2d(stem_width)

        shortcut_name = "downsample" if imagenet else "shortcut"
        in_planes = stem_width
        for i, (planes, stride, depth) in enumerate(zip(_STAGE_PLANES, _STAGE_STRIDES, depths), start=1):
            width = int(ratio * planes)
            conv = self.stage_conv(i, len(depths))
            blocks = []
            for j in range(depth):
                blocks.append(block(conv, in_planes, width, stride if j == 0 else 1, shortcut_name,
                                    moe_shortcut=imagenet))
                in_planes = width * block.expansion
            setattr(self, f"layer{i}", nn.ModuleList(blocks))

        self.head_name = "fc" if imagenet else "linear"
        setattr(self, self.head_name, nn.Linear(in_planes, spec.num_classes))
        init_weights(self)
        self.finish()

    def forward_features(self, x, routing):
        out = F.relu(self.bn1(self.conv1(x)))  # (B, c0, H, W); /2 for ImageNet
        if self.maxpool is not None:
            out = self.maxpool(out)  # (B, c0, H/4, W/4)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                out = block(out, routing)  # (B, w * expansion, h, w) after the stage's stride
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # (B, C)
        return getattr(self, self.head_name)(out)  # (B, classes)


# Each (depth, stem) variant registered once, as `resnet<depth>_<stem>_ori` (dense) and `_moe` (the spec's experts
# decide): the block type and the blocks per stage.
_DEPTHS = {18: (_BasicBlock, (2, 2, 2, 2)), 34: (_BasicBlock, (3, 4, 6, 3)), 50: (_Bottleneck, (3, 4, 6, 3)),
           101: (_Bottleneck, (3, 4, 23, 3)), 152: (_Bottleneck, (3, 8, 36, 3))}
for _stem in ("cifar", "imagenet"):
    for _depth, (_block, _blocks) in _DEPTHS.items():
        register_variant(f"resnet{_depth}_{_stem}", partial(_ResNet, block=_block, depths=_blocks, stem=_stem))

"""DenseNet-BC, CIFAR and ImageNet variants, dense (`*_ori`) and MoE (`*_moe`).

One class, `_DenseNet`, builds the four archs from their `ModelSpec`; a model is MoE when the spec has experts.
Widths scale with the ratio r as everywhere else: each base width below becomes int(r * width).

CIFAR (`densenet_cifar_*`, 32x32), read off `reference/parameters/densenet_cifar_ori_ratio0.5_*`
(DenseNet-BC-40): growth rate 12, three dense blocks of 6 layers, stem 24 channels, bottleneck 48
(4x growth), compression 0.5 (a transition halves the channels, rounding down).
    features.conv0                      3x3 conv, stride 1, int(24 r) channels, no norm of its own
    features.denseblockK.denselayerJ    norm1 (BN), ReLU, conv1 1x1 -> int(48 r); norm2, ReLU,
                                        conv2 3x3 -> int(12 r); output concatenated to the input
    features.transitionK                norm, ReLU, conv 1x1 -> channels // 2, 2x2 average pool
    features.norm_final                 BN, then ReLU, global average pool
    classifier                          Linear(channels, classes)
    All convs are bias-free. At r = 0.5 the channels run 12 -> 48 | 24 -> 60 | 30 -> 66.
ImageNet (`densenet_imagenet_*`; 224x224, any size >= 32 works thanks to adaptive pooling). The
reference has no listing and its builder crashes, so this is our choice: DenseNet-121
(torchvision's configuration) with the CIFAR variant's names: growth rate 32, blocks of 6, 12, 24, 16
layers, stem 64, bottleneck 128, compression 0.5; the stem is `conv0` 7x7 stride 2, `norm0`, ReLU,
`pool0` 3x3 stride-2 max-pool (torchvision's stem, names included).

MoE (the reference's `densenet_*_moe` cannot be built; this design is ours): in every dense layer,
conv1 and conv2 are MoE convs whose experts have the dense model's widths (int(48 r) and int(12 r) on
CIFAR), so each image's concatenated feature map holds its own experts' outputs and every later layer
sees the same channel count as in the dense model of that ratio; norm1/norm2 are shared by the
experts. The stem, the transitions (one 1x1 conv each, a small share of the cost that also mixes the
whole concatenated map) and the classifier stay dense. The global router (`router.*`) comes last.

Initialisation as in `base.init_weights` (Kaiming-normal fan-out convs, per expert; identity BN).
"""
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .base import RoutedNet, call, init_weights, require_channels
from .registry import register_variant
from .spec import ModelSpec

_CIFAR = dict(growth=12, blocks=(6, 6, 6), stem=24, bottleneck=48, imagenet_stem=False)
_IMAGENET = dict(growth=32, blocks=(6, 12, 24, 16), stem=64, bottleneck=128, imagenet_stem=True)


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck), BN-ReLU-conv3x3 (growth); returns the input with the new maps appended."""

    def __init__(self, conv, in_channels, bottleneck, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv(in_channels, bottleneck, 1, 1, 0)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.conv2 = conv(bottleneck, growth, 3, 1, 1)

    def forward(self, x, routing):
        out = call(self.conv1, F.relu(self.norm1(x)), routing)  # (B, bottleneck, H, W)
        out = call(self.conv2, F.relu(self.norm2(out)), routing)  # (B, growth, H, W)
        return torch.cat([x, out], dim=1)  # (B, C + growth, H, W)


class _DenseBlock(nn.Module):
    """`n` dense layers named denselayer1..n; each adds `growth` channels."""

    def __init__(self, conv, n, in_channels, bottleneck, growth):
        super().__init__()
        for j in range(n):
            self.add_module(f"denselayer{j + 1}", _DenseLayer(conv, in_channels + j * growth, bottleneck, growth))

    def forward(self, x, routing):
        for layer in self.children():
            x = layer(x, routing)
        return x


class _Transition(nn.Sequential):
    """BN, ReLU, dense 1x1 conv to `out_channels`, 2x2 average pool (halves the side)."""

    def __init__(self, conv, in_channels, out_channels):
        super().__init__(OrderedDict(
            norm=nn.BatchNorm2d(in_channels),
            relu=nn.ReLU(inplace=True),
            conv=conv(in_channels, out_channels, 1, 1, 0, moe=False),
            pool=nn.AvgPool2d(kernel_size=2, stride=2),
        ))


class _DenseNet(RoutedNet):
    """DenseNet-BC with base widths `growth`, `stem`, `bottleneck` (scaled by ratio) and `blocks` layers per block."""

    def __init__(self, spec: ModelSpec, growth, blocks, stem, bottleneck, imagenet_stem):
        super().__init__(spec)
        ratio = spec.ratio
        require_channels(ratio, {"each dense layer (growth rate)": growth, "the stem": stem,
                                 "each bottleneck": bottleneck})
        growth, stem, bottleneck = int(ratio * growth), int(ratio * stem), int(ratio * bottleneck)
        features = OrderedDict()
        if imagenet_stem:
            features["conv0"] = self.conv(3, stem, 7, stride=2, padding=3, moe=False)
            features["norm0"] = nn.BatchNorm2d(stem)
            features["relu0"] = nn.ReLU(inplace=True)
            features["pool0"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            features["conv0"] = self.conv(3, stem, 3, stride=1, padding=1, moe=False)
        channels = stem
        for k, n in enumerate(blocks, start=1):
            features[f"denseblock{k}"] = _DenseBlock(self.stage_conv(k, len(blocks)), n, channels, bottleneck, growth)
            channels += n * growth
            if k < len(blocks):
                features[f"transition{k}"] = _Transition(self.conv, channels, channels // 2)
                channels //= 2
        features["norm_final"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(features)
        self.classifier = nn.Linear(channels, spec.num_classes)
        init_weights(self)
        self.finish()

    def forward_features(self, x, routing):
        # Walked by hand: dense blocks need the routing. Sides: /4 after an ImageNet stem, /2 per transition.
        for module in self.features:
            x = module(x, routing) if isinstance(module, _DenseBlock) else module(x)  # (B, C, h, w)
        x = F.relu(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, C)
        return self.classifier(x)  # (B, classes)


# Registered once each, as `<name>_ori` (dense) and `<name>_moe` (the spec's experts decide).
register_variant("densenet_cifar", partial(_DenseNet, **_CIFAR))
register_variant("densenet_imagenet", partial(_DenseNet, **_IMAGENET))

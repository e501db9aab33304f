"""VGG-16 with and without BatchNorm, dense (`*_ori`) and MoE (`*_moe`).

One class, `_VGG`, builds the four archs from their `ModelSpec`; a model is MoE when the spec has experts.
The state-dict layout equals the reference's (see `reference/parameters/vgg16_bn_*`). Rules read off the
listings (w = int(ratio * width) everywhere):

`features` is a torchvision-style sequence over the VGG-16 configuration
64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512: each number is a 3x3 conv (padding 1,
no bias) of w channels, followed, in `vgg16_bn_*`, by a BatchNorm, then a ReLU; each M is a 2x2
max-pool. So the module indices are torchvision's: convs at features.0, 3, 7, 10, ... with BN and
features.0, 2, 5, 7, ... without. Then a 2x2 adaptive average pool and the classifier
Linear(int(512 r) * 4, 256), ReLU, Linear(256, 256), ReLU, Linear(256, classes) (`classifier.0/2/4`,
no dropout). Any input of at least 16x16 works (four 2x2 max-pools, then adaptive pooling; a 32x32
image reaches the adaptive pool at 2x2, where it is the identity, as in the reference). Unlike
torchvision's VGG there is no max-pool after the last three convs.

MoE: the first conv (reading RGB) is dense with int(64 r) channels; every other conv is an MoE conv
whose experts have w channels each and read the previous layer's w channels; the BatchNorm after it
has w channels, shared by the experts; the classifier is shared. The global router (`router.*`)
comes last in the state dict.

Our choices where the reference gives no listing or is wrong:
- `vgg16_{ori,moe}` (no BN) keep the bias-free convs of the BN variant, so their layout is the BN
  layout without the BN entries (indices shifted as torchvision's vgg16 vs vgg16_bn).
- `normalize` is applied (the reference's VGG ignores `--normalize`).
- Initialisation as in `base.init_weights` (Kaiming-normal fan-out convs, per expert; identity BN),
  which is also torchvision's VGG conv initialisation and keeps the BN-free VGG-16 trainable.
"""
from functools import partial

import torch
from torch import nn

from .base import RoutedNet, call, init_weights, require_channels
from .registry import register_variant
from .spec import ModelSpec

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_HIDDEN = 256  # classifier hidden width (not scaled by ratio)
_POOL = 2  # side of the adaptive average pool before the classifier


class _VGG(RoutedNet):
    """VGG over `config` (conv widths and 'M' max-pools), with or without BatchNorm."""

    def __init__(self, spec: ModelSpec, config, batch_norm):
        super().__init__(spec)
        ratio = spec.ratio
        require_channels(ratio, {f"features.{i} (a {w}-channel conv)": w for i, w in enumerate(config) if w != "M"})
        layers, in_channels = [], 3
        n_blocks = config.count("M") + (config[-1] != "M")  # a block: the convs up to a max-pool
        block = 1
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                block += 1
                continue
            width = int(ratio * item)
            conv = self.stage_conv(block, n_blocks)
            # The RGB-reading first conv stays dense in the MoE model, as in the reference.
            layers.append(conv(in_channels, width, 3, stride=1, padding=1, moe=in_channels != 3))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            # Not in place: an MoE conv's output is a view of its own under top-1 routing (MoEConv2d), and without
            # BatchNorm the ReLU follows it directly. The same values.
            layers.append(nn.ReLU())
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(_POOL)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * _POOL * _POOL, _HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(_HIDDEN, _HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(_HIDDEN, spec.num_classes),
        )
        init_weights(self)
        self.finish()

    def forward_features(self, x, routing):
        # Not `self.features(x)`: MoE convs need the routing, so the sequence is walked by hand.
        for layer in self.features:
            x = call(layer, x, routing)  # (B, w, H, W); halved by each max-pool
        x = torch.flatten(self.avgpool(x), 1)  # (B, int(512 r) * 4)
        return self.classifier(x)  # (B, classes)


# Registered once each, as `<name>_ori` (dense) and `<name>_moe` (the spec's experts decide).
register_variant("vgg16", partial(_VGG, config=_VGG16, batch_norm=False))
register_variant("vgg16_bn", partial(_VGG, config=_VGG16, batch_norm=True))

"""Routers: the reference's global router network, the per-layer router, and hard top-1 routing."""
import torch
import torch.nn.functional as F
from torch import nn


def hard_top1(logits: torch.Tensor):
    """Pick one expert per image and a straight-through gate.

    Returns (expert (B,) long, gate (B,) or None). The gate's value is exactly 1; its gradient is the
    gradient of the chosen expert's softmax probability, so the router learns from the loss through the
    hard choice (straight-through estimator). The softmax Jacobian keeps that gradient bounded, unlike a
    raw-logit pass-through. No gate is made when nothing needs a gradient to the logits.
    """
    expert = logits.argmax(dim=1)
    if not logits.requires_grad:
        return expert, None
    prob = F.softmax(logits.float(), dim=1).gather(1, expert[:, None]).squeeze(1)  # (B,)
    return expert, (prob - prob.detach() + 1.0).to(logits.dtype)


def top_k_gates(logits: torch.Tensor, k: int):
    """Pick `k` experts per image and their weights: (expert (B, k) long, gate (B, k)).

    The gates are the router's softmax probabilities of the chosen experts renormalised to sum to 1 (equal to a
    softmax over the chosen logits), so the router learns from the loss through them; used for k >= 2 (k = 1
    is `hard_top1`, whose renormalised gate would be a constant 1 without gradient).
    """
    top = logits.topk(k, dim=1)  # values and indices (B, k), largest first
    return top.indices, F.softmax(top.values.float(), dim=1).to(logits.dtype)


class _RouterBlock(nn.Module):
    """Basic block of the router with a parameter-free shortcut (subsample + zero channels)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class Router(nn.Module):
    """The reference's global router: a ResNet-20-like net (16/32/64 channels) reading the input image.

    Its BatchNorm layers always normalise with their running statistics, in training too (`train()` leaves
    them in eval mode): an image's expert then never depends on the rest of its batch (with batch statistics,
    perturbing one image moves the others' routing, and the routing seen in training is not the one at test
    time), and AdvMoE's router step trains exactly the decisions that evaluation makes. The statistics are
    estimated from training images when a run starts (`utils.advmoe.balance_router_init`) and follow the router
    after each of its updates (`utils.advmoe.track_router_statistics`, outside any forward that decides);
    checkpoints of the released code bring their own.
    """

    def __init__(self, n_expert: int, in_channels: int = 3, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [_RouterBlock(in_planes, planes, stride)]
            blocks += [_RouterBlock(planes, planes, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, n_expert)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too
                m.train(False)
        return self

    def forward(self, x):  # (B, 3, H, W) normalised image -> (B, N) logits
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class LayerRouter(nn.Module):
    """The paper's per-layer router (appendix Fig. A1): pooled input feature map -> expert logits."""

    def __init__(self, in_channels: int, n_expert: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, n_expert)

    def forward(self, x):  # (B, C, H, W) -> (B, N)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

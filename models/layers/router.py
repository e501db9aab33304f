"""Routers: the reference's global router network, the per-layer router, and hard top-1 routing."""
import torch
import torch.nn.functional as F
from torch import nn


def float32_routing(x):
    """Autocast off for a router's forward: routing decisions, the bias re-centring and the router's BatchNorm
    statistics all come from float32 logits. Under bf16 autocast 6 of 256 images right after the router's
    initialisation had exactly tied logits (ties go to expert 0) and decisions differed from the float32
    ones evaluation makes. The router costs a few percent of the MoE's FLOPs."""
    return torch.autocast(x.device.type, enabled=False)


def at_least_float32(x):
    """`x` in float32, or as it is when wider (float64 in the tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def hard_top1(logits: torch.Tensor, select_bias: torch.Tensor | None = None):
    """Pick one expert per image and a straight-through gate.

    Returns (expert (B,) long, gate (B,) or None). The expert is `argmax(logits + select_bias)`: the
    selection-only bias (`--balance bias`) moves decisions, never the gate. The gate's value is exactly 1; its
    gradient is the gradient of the chosen expert's softmax probability of the raw logits, so the router learns
    from the loss through the hard choice (straight-through estimator). The softmax Jacobian keeps that
    gradient bounded, unlike a raw-logit pass-through. No gate is made when nothing needs a gradient to the
    logits.
    """
    expert = selection_scores(logits, select_bias).argmax(dim=1)
    if not logits.requires_grad:
        return expert, None
    prob = F.softmax(logits.float(), dim=1).gather(1, expert[:, None]).squeeze(1)  # (B,)
    return expert, (prob - prob.detach() + 1.0).to(logits.dtype)


def selection_scores(logits: torch.Tensor, select_bias: torch.Tensor | None) -> torch.Tensor:
    """The scores whose argmax is the routing decision: (B, N) logits plus the selection-only bias (no gradient)."""
    return logits if select_bias is None else logits + select_bias.detach().to(logits.dtype)


class BalanceState(nn.Module):
    """A router's load-balancing state (`--balance bias|bias-sign`): the selection-only bias and a running load
    estimate.

    Both are non-persistent buffers, so the router's state dict keeps the released code's layout (its
    checkpoints load strictly); checkpoints of this tool carry them under their own key
    (`models.base.RoutedNet.balance_state`).
    """

    def __init__(self, n_expert: int):
        super().__init__()
        self.register_buffer("select_bias", torch.zeros(n_expert), persistent=False)  # (N,) added for argmax only
        self.register_buffer("load_ema", torch.full((n_expert,), 1.0 / n_expert), persistent=False)  # (N,) shares


def top_k_gates(logits: torch.Tensor, k: int, select_bias: torch.Tensor | None = None):
    """Pick `k` experts per image and their weights: (expert (B, k) long, gate (B, k)).

    The experts are the top k of `logits + select_bias` (the selection-only bias moves choices, never gates). The
    gates are the router's softmax probabilities of the chosen experts renormalised to sum to 1 (a softmax over
    the chosen raw logits), so the router learns from the loss through them; used for k >= 2 (k = 1 is
    `hard_top1`, whose renormalised gate would be a constant 1 without gradient).
    """
    expert = selection_scores(logits, select_bias).topk(k, dim=1).indices  # (B, k), best first
    return expert, F.softmax(logits.gather(1, expert).float(), dim=1).to(logits.dtype)


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
    estimated from training images when a run starts (`utils.balance.init_router`) and follow the router
    after each of its updates (`utils.balance.track_router_statistics`, outside any forward that decides);
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
        self.balance = BalanceState(n_expert)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too
                m.train(False)
        return self

    def forward(self, x):  # (B, 3, H, W) normalised image -> (B, N) float32 logits
        with float32_routing(x):
            x = at_least_float32(x)
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer3(self.layer2(self.layer1(out)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class LayerRouter(nn.Module):
    """The paper's per-layer router (appendix Fig. A1): pooled input feature map -> expert logits."""

    def __init__(self, in_channels: int, n_expert: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, n_expert)
        self.balance = BalanceState(n_expert)

    def forward(self, x):  # (B, C, H, W) -> (B, N) float32 logits
        with float32_routing(x):
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(at_least_float32(x), 1), 1))

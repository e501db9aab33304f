"""FLOP accounting with torch.utils.flop_counter, printed like the paper's cost tables.

FLOPs = 2 x multiply-adds of convolutions and matrix products (forward and backward), the convention of
the reference's measurements (ResNet-18 CIFAR, dense r=1.0: 1.11 GFLOPs per 32x32 image). BatchNorm,
activations, pooling and additions are not counted. The sparse MoE runs only each image's own expert, so
counting what is executed gives the activated cost; the dense-masked mode (the reference's computation)
counts every expert.

Its command line is `python -m utils.tools.flops` (utils/tools/flops.py).
"""
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import flop_counter
from torch.utils._pytree import tree_map

from models.spec import is_moe
from .attack import eval_mode


class _TotalFlops(TorchDispatchMode):
    """Sums torch.utils.flop_counter's per-operator FLOP formulas over every operator dispatched.

    `FlopCounterMode` itself also attributes FLOPs to modules through autograd hooks on module inputs, and
    those hooks make `torch.autograd.grad` with respect to a leaf input fail (as every PGD attack does:
    "A leaf node was passed to _will_engine_execute_node"); we only need the total.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.total += _operator_flops(func, args, kwargs, out)
        return out


def _operator_flops(func, args, kwargs, out) -> int:
    """torch's FLOP formula of one operator call (0 for uncounted ones): from torch 2.2 `flop_registry`, whose
    formulas take the tensors and `out_val=`; in torch 2.1 `flop_mapping`, whose formulas take shapes."""
    registry = getattr(flop_counter, "flop_registry", None)
    if registry is not None:
        formula = registry.get(func._overloadpacket)
        return 0 if formula is None else formula(*args, **kwargs, out_val=out)
    formula = flop_counter.flop_mapping.get(func._overloadpacket)
    if formula is None:
        return 0
    args, kwargs, out_shape = tree_map(flop_counter.get_shape, (args, kwargs, out))
    return formula(*args, **kwargs, out_shape=out_shape)


def count_flops(fn) -> int:
    """FLOPs executed by `fn()` (forward and any backward it runs), as an int."""
    with _TotalFlops() as counter:
        fn()
    return counter.total


def _images(batch, image_size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, image_size, image_size, generator=g).to(device)


def inference_gflops(model, image_size=32, batch=8, device="cpu") -> dict:
    """GFLOPs per image of one eval-mode forward of `model` on `image_size` x `image_size` images.

    Returns {"total"} and, for a globally routed MoE, also {"router", "backbone"} (total = router + backbone).
    The model's modes are restored afterwards.
    """
    x = _images(batch, image_size, device)
    with eval_mode(model), torch.no_grad():
        total = count_flops(lambda: model(x)) / batch / 1e9
        out = {"total": total}
        if is_moe(model) and model.routing_mode == "global":
            router = count_flops(lambda: model.route(x)) / batch / 1e9
            out.update(router=router, backbone=total - router)
    return out


def training_step_gflops(step, x, y) -> float:
    """GFLOPs per image of one training update `step(x, y)` (attacks, forwards and backwards)."""
    return count_flops(lambda: step(x, y)) / len(y) / 1e9


def make_train_step(model, kind="auto", *, num_steps=2, at="trades", lr=0.0, scaler=None, **cfg):
    """A `step(x, y)` closure doing one update of `model` with fresh SGD optimizers.

    kind: 'advmoe' (router step then expert step), 'joint' (one update of everything; the dense models'
    TRADES/PGD-AT step) or 'auto' (advmoe for an MoE, joint for a dense model). `lr` 0 by default so that
    counting or timing steps leaves the weights as they were (BatchNorm running statistics still move).
    `scaler`: a GradScaler for fp16 autocast, or None. Extra keywords go to `utils.steps.StepConfig` (eps,
    step_size, beta, alpha, router_objective, balance, balance_strength: the entry scripts' defaults under
    `--advmoe-recipe paper`). The
    router upkeep of training follows each router update; its balancing pass runs on the batch itself (training
    draws 64 un-augmented training images per update instead).
    """
    from .balance import RouterUpkeep
    from .steps import StepConfig, make_step
    from .update import StepContext
    if kind == "auto":
        kind = "advmoe" if is_moe(model) else "joint"
    step_cfg = StepConfig(at=at, num_steps=num_steps, **cfg)
    if kind == "advmoe":
        ctx = StepContext(torch.optim.SGD(model.backbone_parameters(), lr=lr),
                          torch.optim.SGD(model.router_parameters(), lr=lr), scaler)
    else:
        ctx = StepContext(torch.optim.SGD(model.parameters(), lr=lr), scaler=scaler)
    return make_step(model, step_cfg, ctx, kind, RouterUpkeep(step_cfg.balance, step_cfg.balance_strength))


def train_step_gflops(model, kind="auto", *, image_size=32, batch=8, num_classes=10, device="cpu", **cfg) -> float:
    """GFLOPs per image of one training update of a copy of `model` (the model itself is left untouched).

    Batch `batch` of random images and labels; see `make_train_step` for `kind`; `cfg` goes to it too
    (`num_steps`: the attacks' steps, default 2; `at`: default "trades").
    """
    model = copy.deepcopy(model).train()
    x = _images(batch, image_size, device, seed=1)
    y = torch.randint(0, num_classes, (batch,), generator=torch.Generator().manual_seed(2)).to(device)
    cfg.setdefault("num_steps", 2)
    cfg.setdefault("at", "trades")
    step = make_train_step(model, kind, **cfg)
    return training_step_gflops(step, x, y)

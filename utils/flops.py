"""FLOP accounting with torch.utils.flop_counter, printed like the paper's cost tables.

FLOPs = 2 x multiply-adds of convolutions and matrix products (forward and backward), the convention of
the reference's measurements (ResNet-18 CIFAR, dense r=1.0: 1.11 GFLOPs per 32x32 image). BatchNorm,
activations, pooling and additions are not counted. The sparse MoE runs only each image's own expert, so
counting what is executed gives the activated cost; the dense-masked mode (the reference's computation)
counts every expert.

Command line (`python -m utils.flops --help`):
    python -m utils.flops --arch resnet18_cifar_moe --ratio 0.5 --n-expert 2 --train-step
prints the dense model at ratio 1.0 and at --ratio, the activated MoE (backbone and router separately), the
reference's dense-masked MoE, and with --train-step the cost of one training update (AdvMoE or joint for MoE,
TRADES or PGD-AT for dense), all in GFLOPs per image.
"""
import argparse
import copy
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils import flop_counter
from torch.utils._pytree import tree_map

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
        if getattr(model, "is_moe", False) and model.routing_mode == "global":
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
    step_size, beta, alpha, router_objective, balance, balance_strength: the entry scripts' defaults). The
    router upkeep of training follows each router update; its balancing pass runs on the batch itself (training
    draws 64 un-augmented training images per update instead).
    """
    from .advmoe import advmoe_step
    from .balance import RouterUpkeep
    from .steps import StepConfig, joint_step
    from .update import StepContext
    if kind == "auto":
        kind = "advmoe" if getattr(model, "is_moe", False) else "joint"
    step_cfg = StepConfig(at=at, num_steps=num_steps, **cfg)
    upkeep = RouterUpkeep(step_cfg.balance, step_cfg.balance_strength)
    if kind == "advmoe":
        ctx = StepContext(torch.optim.SGD(model.backbone_parameters(), lr=lr),
                          torch.optim.SGD(model.router_parameters(), lr=lr), scaler)
        return lambda x, y: advmoe_step(model, x, y, step_cfg, ctx, upkeep=upkeep)
    if kind == "joint":
        ctx = StepContext(torch.optim.SGD(model.parameters(), lr=lr), scaler=scaler)
        return lambda x, y: joint_step(model, x, y, step_cfg, ctx, upkeep=upkeep)
    raise ValueError(f"unknown training step kind {kind!r} (advmoe, joint, auto)")


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


def format_flops_table(rows, title=None) -> str:
    """Rows of dicts (name, total, backbone, router, step; missing or None -> '-') -> aligned text table.

    Every number is in GFLOPs per image.
    """
    cols = ("model", "inference", "backbone", "router", "train step")
    keys = ("name", "total", "backbone", "router", "step")
    width = max([len(cols[0])] + [len(str(r.get("name", ""))) for r in rows])

    def cell(value, i):
        w = width if i == 0 else 10
        if isinstance(value, float):
            return f"{value:>{w}.3f}"
        text = "-" if value is None else str(value)
        return f"{text:<{w}}" if i == 0 else f"{text:>{w}}"

    lines = [title] if title else []
    lines.append(" | ".join(f"{c:<{width}}" if i == 0 else f"{c:>10}" for i, c in enumerate(cols)))
    lines.append("-+-".join("-" * (width if i == 0 else 10) for i in range(len(cols))))
    for r in rows:
        lines.append(" | ".join(cell(r.get(k), i) for i, k in enumerate(keys)))
    return "\n".join(lines)


def flops_rows(spec, *, image_size=32, train_step=False, num_steps=2, batch=8, at="trades", moe_training="advmoe",
               device="cpu") -> list[dict]:
    """Rows for `format_flops_table`: the dense counterpart of `spec` (a `models.ModelSpec`) at ratio 1.0 and at
    its ratio; for an MoE spec also the activated (sparse) MoE and the reference's dense-masked MoE, with MoE convs
    in its `moe_stages` (None: all) and `top_k` experts per image (the activated cost grows with it). GFLOPs per
    image."""
    import models
    from models.spec import dense_arch
    rows = []
    dense = dense_arch(spec.arch)
    for r in dict.fromkeys((1.0, spec.ratio)):  # both ratios, once each
        model = models.build_model(dense, num_classes=spec.num_classes, ratio=r).to(device)
        rows.append(dict(name=f"{dense} r={r:g}", **inference_gflops(model, image_size, batch, device)))
        if train_step:
            rows[-1]["step"] = train_step_gflops(model, "joint", image_size=image_size, batch=batch,
                                                 num_classes=spec.num_classes, num_steps=num_steps, at=at,
                                                 device=device)
    if spec.is_moe:
        placement = "" if spec.moe_stages is None else f" stages={','.join(map(str, sorted(set(spec.moe_stages))))}"
        placement += f" k={spec.top_k}" if spec.top_k != 1 else ""
        for sparse, label in ((True, "activated"), (False, "dense-masked, as the reference")):
            model = models.build_model(spec, sparse=sparse).to(device)
            row = dict(name=f"{spec.arch} r={spec.ratio:g} N={spec.n_expert}{placement} {label}",
                       **inference_gflops(model, image_size, batch, device))
            if train_step:
                row["step"] = train_step_gflops(model, moe_training, image_size=image_size, batch=batch,
                                                num_classes=spec.num_classes, num_steps=num_steps, at=at,
                                                device=device)
            rows.append(row)
    return rows


def get_args_parser():
    p = argparse.ArgumentParser(prog="python -m utils.flops",
                                description="GFLOPs per image of dense and MoE models and of one training step")
    p.add_argument("--arch", required=True, help="registry name (e.g. resnet18_cifar_moe)")
    p.add_argument("--ratio", type=float, default=1.0, help="width ratio in (0, 1]")
    p.add_argument("--n-expert", type=int, default=None, help="experts per MoE layer (MoE archs)")
    p.add_argument("--dataset", default="CIFAR10", help="sets the image size and the number of classes")
    p.add_argument("--image-size", type=int, default=None, help="overrides the dataset's image size (pixels)")
    p.add_argument("--train-step", action="store_true", help="also count one training update")
    p.add_argument("--num-steps", type=int, default=2, help="attack steps of the training update")
    p.add_argument("--moe-stages", type=int, nargs="+", default=None, metavar="S",
                   help="stages holding MoE convs, the others dense (default: all)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="experts per image in every MoE layer")
    p.add_argument("--at", default="trades", choices=("trades", "pgd", "fast"), help="robust loss of the update")
    p.add_argument("--moe-training", default="advmoe", choices=("advmoe", "joint"), help="MoE update")
    p.add_argument("--batch", type=int, default=8, help="images per counted batch")
    return p


def main(args) -> int:
    from models import ModelSpec
    from .data import dataset_info
    from .errors import UsageError
    try:
        info = dataset_info(args.dataset)
        spec = ModelSpec(args.arch, ratio=args.ratio, num_classes=info.num_classes, n_expert=args.n_expert,
                         moe_stages=args.moe_stages, top_k=args.top_k).validate()
        if args.batch < 1 or args.num_steps < 0 or (args.image_size is not None and args.image_size < 8):
            raise UsageError("--batch must be >= 1, --num-steps >= 0 and --image-size >= 8")
    except (UsageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image_size = args.image_size or info.image_size
    try:
        rows = flops_rows(spec, image_size=image_size, train_step=args.train_step, num_steps=args.num_steps,
                          batch=args.batch, at=args.at, moe_training=args.moe_training)
    except ValueError as e:  # e.g. a stage the arch does not have
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = f"; train step: {args.num_steps}-step {args.at} attacks, batch {args.batch}" if args.train_step else ""
    print(format_flops_table(rows, title=f"GFLOPs per image ({args.dataset}, {image_size}x{image_size}{step})"))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))

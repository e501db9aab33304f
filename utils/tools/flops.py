"""GFLOPs per image of dense and MoE models and of one training step, printed like the paper's cost tables.

    python -m utils.tools.flops --arch resnet18_cifar_moe --ratio 0.5 --n-expert 2 --train-step

prints the dense model at ratio 1.0 and at --ratio, the activated MoE (backbone and router separately), the
reference's dense-masked MoE, and with --train-step the cost of one training update (AdvMoE or joint for MoE,
TRADES or PGD-AT for dense), all in GFLOPs per image. The counting is the library's (utils/flops.py).
"""
import argparse
import sys

from ..flops import inference_gflops, train_step_gflops


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
    p = argparse.ArgumentParser(prog="python -m utils.tools.flops",
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
    from ..data import dataset_info
    from ..errors import UsageError
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

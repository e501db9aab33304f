"""FLOP accounting with torch.utils.flop_counter (FLOPs = 2 x multiply-adds, as the paper's tables).

The sparse MoE runs only each image's own expert, so counting the operations actually executed gives the
activated cost; the dense-masked mode (the reference's computation) counts every expert.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode

from .attack import eval_mode


def count_flops(fn) -> int:
    """FLOPs executed by `fn()` (forward and any backward it runs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def inference_gflops(model, image_size=32, batch=8, device="cpu") -> dict:
    """GFLOPs per image of one eval-mode forward: total, and for MoE models router and backbone."""
    x = torch.rand(batch, 3, image_size, image_size, device=device)
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


def format_flops_table(rows) -> str:
    """Rows of dicts (name, total, router, backbone, step) -> an aligned text table in GFLOPs/image."""
    cols = ("model", "total", "backbone", "router", "train step")
    keys = ("name", "total", "backbone", "router", "step")
    lines = [" | ".join(f"{c:>12}" for c in cols)]
    for r in rows:
        cells = [f"{r.get(k):>12.3f}" if isinstance(r.get(k), float) else f"{str(r.get(k, '-')):>12}" for k in keys]
        lines.append(" | ".join(cells))
    return "\n".join(lines)

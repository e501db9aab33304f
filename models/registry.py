"""Model registry: builders register themselves by name; `list_models` feeds argparse choices and tests."""
from typing import Callable

_BUILDERS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Decorator: register a builder under its function name (names are unique)."""
    name = fn.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is registered twice")
    _BUILDERS[name] = fn
    return fn


def list_models(kind: str | None = None) -> list[str]:
    """Sorted registered names; `kind` 'ori' or 'moe' keeps only dense or MoE archs."""
    names = sorted(_BUILDERS)
    if kind is not None:
        names = [n for n in names if n.endswith(f"_{kind}")]
    return names


def is_moe(name: str) -> bool:
    return name.endswith("_moe")


def build_model(name: str, num_classes: int = 10, ratio: float = 1.0, n_expert: int | None = None,
                normalize: tuple | None = None, routing: str = "global", sparse: bool = True,
                moe_stages=None, top_k: int = 1):
    """Build a registered model.

    Args:
        name: registry name (`*_ori` dense, `*_moe` Mixture-of-Experts).
        num_classes: classifier outputs.
        ratio: width ratio in (0, 1]; every (expert) width is int(ratio * width).
        n_expert: experts per MoE layer; required for `_moe` archs, must be None (or 1) for `_ori`.
        normalize: (mean, std) applied inside the model to [0,1] inputs, or None.
        routing: 'global' (one router for the network, the reference's) or 'layer' (a router per MoE layer).
        sparse: MoE layers compute only each image's own expert (True) or every expert, masked (False).
        moe_stages: stages (1-based: ResNet 1-4, WRN 1-3, VGG blocks 1-5, DenseNet dense blocks) that hold MoE
            convs, the others dense at the same width ratio; None: every stage (the reference's layout).
        top_k: experts per image in every MoE layer (1: the reference's hard top-1 routing).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown arch {name!r}; valid: {', '.join(list_models())}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if is_moe(name):
        if n_expert is None or n_expert < 1:
            raise ValueError(f"arch {name} needs n_expert >= 1, got {n_expert}")
    elif n_expert not in (None, 1):
        raise ValueError(f"arch {name} is dense; n_expert={n_expert} applies to MoE archs only")
    elif moe_stages is not None or top_k != 1:
        raise ValueError(f"arch {name} is dense; moe_stages and top_k apply to MoE archs only")
    if routing not in ("global", "layer"):
        raise ValueError(f"routing must be 'global' or 'layer', got {routing!r}")
    moe = dict(n_expert=n_expert, routing=routing, sparse=sparse, moe_stages=moe_stages, top_k=top_k) \
        if is_moe(name) else {}
    return _BUILDERS[name](num_classes=num_classes, ratio=ratio, normalize=normalize, **moe)

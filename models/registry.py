"""Model registry: builders register themselves by name; `list_models` feeds argparse choices and tests."""
from dataclasses import replace
from typing import Callable

from .spec import ModelSpec

_BUILDERS: dict[str, Callable] = {}


def register_variant(name: str, build: Callable) -> None:
    """Register `build(spec) -> model` under its dense and MoE names, `<name>_ori` and `<name>_moe` (one class
    builds both: the spec's experts make the difference). Names are unique."""
    names = (f"{name}_ori", f"{name}_moe")
    for arch in names:
        if arch in _BUILDERS:
            raise ValueError(f"model {arch!r} is registered twice")
    _BUILDERS.update(dict.fromkeys(names, build))


def _families():
    """Import every model family once: each registers its builders when imported."""
    from . import densenet, resnet, vgg, wrn  # noqa: F401


def list_models() -> list[str]:
    """Sorted registered names."""
    _families()
    return sorted(_BUILDERS)


def build_model(spec: ModelSpec | str, **fields):
    """Build a registered model from its `ModelSpec`, validated first (ValueError naming the wrong setting).

    `build_model(arch, **fields)` is `build_model(ModelSpec(arch, **fields))`, e.g.
    `build_model("resnet18_cifar_moe", ratio=0.5, n_expert=2)`.
    """
    spec = ModelSpec(spec, **fields) if isinstance(spec, str) else replace(spec, **fields)
    spec = spec.validate()
    _families()
    return _BUILDERS[spec.arch](spec)

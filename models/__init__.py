"""Model registry: dense (`*_ori`) and MoE (`*_moe`) ResNet, WideResNet, VGG and DenseNet.

`models.spec` (what a model is) imports without torch, so torch-free tools (`utils.tools.report`) read it too; the
registry and the model classes load on first use (`models.build_model`, `models.list_models`, ...).
"""
import importlib

from .spec import ModelSpec, is_moe

_LAZY = {"build_model": "registry", "list_models": "registry", "register_variant": "registry",
         "RoutedNet": "base", "RoutingInfo": "base"}
__all__ = ["build_model", "list_models", "is_moe", "register_variant", "ModelSpec", "RoutedNet", "RoutingInfo"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)

"""Model registry: dense (`*_ori`) and MoE (`*_moe`) ResNet, WideResNet, VGG and DenseNet."""
from . import densenet, resnet, vgg, wrn  # noqa: F401  (registration)
from .base import RoutedNet, RoutingInfo
from .registry import build_model, list_models, register_model
from .spec import ModelSpec, is_moe

__all__ = ["build_model", "list_models", "is_moe", "register_model", "ModelSpec", "RoutedNet", "RoutingInfo"]

"""Model registry: dense (`*_ori`) and MoE (`*_moe`) ResNet, WideResNet, VGG and DenseNet."""
from . import densenet, resnet, vgg, wrn  # noqa: F401  (registration)
from .base import RoutedNet, RoutingInfo
from .registry import build_model, is_moe, list_models, register_model

__all__ = ["build_model", "list_models", "is_moe", "register_model", "RoutedNet", "RoutingInfo"]

from .registry import MODEL_SPECS, available_models, build_model
from .resnet import BLOCK_ORDERS, ResidualBlock, ResNet, ResNetSpec

__all__ = ["MODEL_SPECS", "available_models", "build_model", "BLOCK_ORDERS", "ResidualBlock", "ResNet",
           "ResNetSpec"]

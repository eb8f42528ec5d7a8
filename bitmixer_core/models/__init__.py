from .registry import MODEL_SPECS, available_models, build_model
from .resnet import BasicBlock, Bottleneck, ResNet, ResNetSpec

__all__ = ["MODEL_SPECS", "available_models", "build_model", "BasicBlock", "Bottleneck", "ResNet", "ResNetSpec"]

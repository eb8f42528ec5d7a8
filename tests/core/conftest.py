import pytest
import torch

from bitmixer_core import build_model, calibrate_activation_step_sizes


@pytest.fixture
def tiny():
    """A calibrated resnet_tiny (small stem, 32x32) and a batch of images."""
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    images = torch.randn(8, 3, 32, 32)
    calibrate_activation_step_sizes(model, images)
    return model, images

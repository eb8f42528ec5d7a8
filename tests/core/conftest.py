import pytest
import torch

from bitmixer_core import build_model, calibrate_activation_step_sizes


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The core tests use small tensors: one intra-op thread. On a loaded 2-core machine two OpenMP
    threads made a tiny forward/backward ~30x slower (threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(one_torch_thread):
    """A calibrated resnet_tiny (small stem, 32x32) and a batch of images."""
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=10, stem="small")
    images = torch.randn(8, 3, 32, 32)
    calibrate_activation_step_sizes(model, images)
    return model, images

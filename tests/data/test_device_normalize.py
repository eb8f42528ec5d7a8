"""The loaders' normalisation, the same torch arithmetic on CPU and CUDA (run here on CPU tensors)."""

import pytest
import torch

from orchestrator.data import DataConfig
from orchestrator.data.loaders import NormalizeImages


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_normalize_matches_the_definition(channels_last):
    """uint8 channels-last batch -> (x/255 - mean)/std in float32, in the memory format the config asks for."""
    cfg = DataConfig(path="unused", channels_last=channels_last)
    images = torch.randint(0, 256, (2, 7, 5, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # as ToTorchImage gives
    out = NormalizeImages(cfg)(images)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 7, 5)
    torch.testing.assert_close(out, (images.float() / 255 - mean) / std)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)

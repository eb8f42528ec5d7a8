"""Normalisation moved out of FFCV's pipeline: the loaders hand out uint8 batches and `NormalizeImages`
normalises them where they are consumed (the GPU on CUDA, the training process on CPU). Training must see
the same values as before: the former path was FFCV's `NormalizeImage`, a float32 lookup table computed in
float64, followed by `ToTorchImage`.

The bound. With S = 255 std, M = 255 mean (per channel) and v = (x - M) / S the exact value, the new path
computes fl(fl(x * a) + b) with a = fl(1 / S) and b = fl(-M / S) (fl: one float32 rounding, relative error at
most u = 2^-24; x, an integer below 256, converts exactly). Expanding to first order in u,
|new - v| <= u (2 x / S + M / S + |v|); the former table holds fl(v), |fl(v) - v| <= u |v|. Hence
|new - old| <= u (2 x / S + M / S + 2 |v|) (+ O(u^2)), about 1e-6 for ImageNet's statistics, per element;
a fused multiply-add only makes it smaller.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

from orchestrator.data import DataConfig
from orchestrator.data.beton import IMAGE_FIELD, LABEL_FIELD
from orchestrator.data.loaders import NormalizeImages, _image_tail, build_train_loader, build_val_loader

# Numba (inside FFCV) sometimes raises a KeyError from a finaliser when a compiled loader is collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
U = 2.0**-24


def rounding_bound(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Per-element bound on |new - former| (module docstring), as float64, shaped like `images` (NCHW)."""
    scale = torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1) * 255
    mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1) * 255
    x = images.to(torch.float64)
    exact = (x - mean) / scale
    return U * (2 * x / scale + mean / scale + 2 * exact.abs()) * (1 + 1e-6)  # the factor covers O(u^2)


def former_lookup(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """The former CPU path's values: FFCV's own lookup table, indexed by the uint8 pixels."""
    table = torch.from_numpy(
        NormalizeImage(np.array(cfg.mean) * 255, np.array(cfg.std) * 255, np.float32).lookup_table.copy()
    )  # 256 x 3
    return table[images.long(), torch.arange(3).view(1, 3, 1, 1)]


@pytest.mark.parametrize("numba_on_cpu", [True, False], ids=["numba loop", "tensor passes (the GPU path)"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_pixel_value_matches_the_former_lookup_table(channels_last, numba_on_cpu):
    """All 256 values of every channel, normalised by either path, are within the rounding bound of FFCV's
    former lookup table; the output is float32 in the memory format the config asks for."""
    cfg = DataConfig(path="unused", channels_last=channels_last)
    values = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(2, 16, 16, 3)
    images = values.contiguous().permute(0, 3, 1, 2)  # NHWC memory, as FFCV hands them out
    out = NormalizeImages(cfg, numba_on_cpu=numba_on_cpu)(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 16, 16)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)
    error = (out.double() - former_lookup(images, cfg).double()).abs()
    bound = rounding_bound(images, cfg)
    assert torch.all(error <= bound), (error - bound).max()
    assert bound.max() < 1.2e-6  # the bound itself is tight: a wrong mean or std is off by far more
    # The definition in plain float64 arithmetic, for a reader who trusts neither side.
    torch.testing.assert_close(out.double(), (images.double() / 255 - torch.tensor(cfg.mean, dtype=torch.float64)
                               .view(1, 3, 1, 1)) / torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1),
                               rtol=0, atol=2e-6)


def test_cpu_batches_stay_valid_for_one_more_iteration():
    """On CPU the output comes from a ring of two reused buffers: a batch survives the next one (and a new
    shape gets its own buffer), as the loaders' docstring promises."""
    cfg = DataConfig(path="unused")
    normalise = NormalizeImages(cfg)
    first_input = torch.zeros(2, 4, 4, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    second_input = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8).permute(0, 3, 1, 2)
    first = normalise(first_input)
    kept = first.clone()
    second = normalise(second_input)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    assert normalise(first_input[:1]).shape == (1, 3, 4, 4)


def test_where_normalisation_runs():
    """No FFCV normalisation in either pipeline; CUDA moves the uint8 batch to the GPU before the NCHW view
    (so `NormalizeImages` runs on the GPU), CPU keeps it in the training process; the NCHW view is always the
    copy-free channels-last one; the normalised batch stays on the device it came from."""
    cpu, cuda = _image_tail(CPU), _image_tail(torch.device("cuda", 0))
    for tail in (cpu, cuda):
        assert not any(isinstance(op, NormalizeImage) for op in tail)
        assert isinstance(tail[-1], ToTorchImage) and tail[-1].channels_last
    assert not any(isinstance(op, ToDevice) for op in cpu)
    moves = [op for op in cuda if isinstance(op, ToDevice)]
    assert len(moves) == 1 and moves[0].device == torch.device("cuda", 0)
    assert cuda.index(moves[0]) < len(cuda) - 1  # moved as uint8, before the view and the normalisation
    images = torch.zeros(1, 2, 2, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    assert NormalizeImages(DataConfig(path="unused"))(images).device == CPU


def former_loader(cfg: DataConfig, decoder, *, train: bool) -> Loader:
    """The loader as it was: FFCV normalises on CPU, then `ToTorchImage` (contiguous NCHW by default)."""
    mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
    name = "train.beton" if train else "val.beton"
    return Loader(
        f"{cfg.path}/{name}", batch_size=cfg.batch_size, num_workers=cfg.num_workers, os_cache=cfg.in_memory,
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, seed=cfg.seed, drop_last=train,
        pipelines={
            IMAGE_FIELD: [decoder, *([RandomHorizontalFlip()] if train else []), NormalizeImage(mean, std, np.float32),
                          ToTensor(), ToTorchImage(channels_last=cfg.channels_last)],
            LABEL_FIELD: [IntDecoder(), ToTensor()],
        },
    )


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from orchestrator.data.embedded import write_embedded_digits

    return write_embedded_digits(tmp_path_factory.mktemp("digits"))


def pixels_read(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """The uint8 values behind a normalised batch (exact: the rounding error is ~1e-6 * 255 << 0.5)."""
    std = torch.tensor(cfg.std, dtype=torch.float64).view(1, 3, 1, 1) * 255
    mean = torch.tensor(cfg.mean, dtype=torch.float64).view(1, 3, 1, 1) * 255
    return torch.round(x.double() * std + mean)


def test_validation_batches_equal_the_former_path(digits):
    """The embedded digits through the new validation loader and through the former FFCV-normalised one:
    same labels in the same order, every value within the rounding bound, same memory format."""
    cfg = DataConfig(path=str(digits), val_resolution=32, val_crop_ratio=1.0, batch_size=128, num_workers=1)
    new = build_val_loader(cfg, rank=0, world_size=1, device=CPU)
    former = former_loader(cfg, CenterCropRGBImageDecoder((32, 32), ratio=1.0), train=False)
    batches = 0
    for (x, y), (x_old, y_old) in zip(new, former, strict=True):
        assert torch.equal(y, y_old.view(-1).long())
        assert x.shape == x_old.shape and x.is_contiguous() and x_old.is_contiguous()
        error = (x.double() - x_old.double()).abs()
        assert torch.all(error <= rounding_bound(pixels_read(x, cfg), cfg))
        batches += 1
    assert batches == len(former) > 1


def test_training_batches_equal_the_former_path(digits):
    """Training batches (full-image crops, so only the unseeded flip is random): the same seeded order of
    labels as the former FFCV-normalised loader, and every image within the rounding bound of the former
    one or of its mirror image."""
    cfg = DataConfig(path=str(digits), train_resolution=32, train_crop_scale=(1.0, 1.0), batch_size=100,
                     num_workers=1, seed=5)
    new = build_train_loader(cfg, rank=0, world_size=1, device=CPU, distributed=False)
    former = former_loader(cfg, RandomResizedCropRGBImageDecoder((32, 32), scale=(1.0, 1.0)), train=True)
    new.set_epoch(1)
    former.next_epoch = 1
    worst, mirrored, batches = 0.0, 0, 0
    for (x, y), (x_old, y_old) in zip(new, former, strict=True):
        assert torch.equal(y, y_old.view(-1).long())
        bound = rounding_bound(pixels_read(x, cfg), cfg)
        error = (x.double() - x_old.double()).abs()
        same = (error <= bound).flatten(1).all(1)
        flipped = ((x.double() - x_old.double().flip(3)).abs() <= bound).flatten(1).all(1)
        assert torch.all(same | flipped)
        mirrored += int((flipped & ~same).sum())
        worst = max(worst, float(torch.where(same, error.flatten(1).amax(1), 0.0).max()))
        batches += 1
    assert batches == len(former) == len(new)
    assert mirrored > 0  # the mirror test is not vacuous: flips happen and are told apart
    assert worst < 1.2e-6

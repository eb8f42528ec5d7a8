"""What goes into a `.beton` comes back out: labels exactly, images within a small pixel error."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from ffcv.reader import Reader

from orchestrator.data import DataConfig, build_loaders, read_classes
from orchestrator.data.config import WriterConfig
from orchestrator.data.convert import convert_image_folder
from orchestrator.data.embedded import digits_images, stratified_split, write_embedded_digits

from .helpers import make_image_folder

# Numba (inside FFCV) sometimes raises a KeyError from a finaliser when a compiled loader is collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CPU = torch.device("cpu")
# Mean absolute error (0-255 scale) allowed after JPEG at quality 90; the test checks that a swapped image or
# a one-pixel shift of the source is far above it, so the bound can catch them.
JPEG_BOUND = 4.0


def read_back(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Every validation image (HxWx3, 0-255) and label, in file order, normalisation undone."""
    _, val = build_loaders(cfg, rank=0, world_size=1, device=CPU, distributed=False)
    images, labels = [], []
    for x, y in val:
        images.append(x.permute(0, 2, 3, 1).numpy().copy())
        labels.append(y.numpy().copy())
    images = np.concatenate(images) * (np.array(cfg.std) * 255) + np.array(cfg.mean) * 255
    return images, np.concatenate(labels)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("round_trip")
    made = make_image_folder(root / "src", per_class={"train": 5, "val": 4})
    writer = WriterConfig(compress_probability=1.0, jpeg_quality=90, page_size=2 * 1024 * 1024, workers=2)
    convert_image_folder(root / "src", root / "out", writer)
    return root / "out", made


def test_image_folder_round_trip(converted):
    """Sequential read with a ratio-1 centre crop gives back every label exactly and every (JPEG) image
    within JPEG_BOUND mean pixel error of its own source, in the source order."""
    out, made = converted
    cfg = DataConfig(path=str(out), val_resolution=32, val_crop_ratio=1.0, batch_size=5, num_workers=1)
    images, labels = read_back(cfg)
    sources = np.stack([image for _, image, _ in made["val"]]).astype(np.float64)
    assert labels.tolist() == [label for _, _, label in made["val"]]
    errors = np.abs(images - sources).mean(axis=(1, 2, 3))
    assert errors.max() < JPEG_BOUND, errors
    # The bound is meaningful: the neighbour's image, or the image shifted by one pixel, is far outside it.
    assert np.abs(images - np.roll(sources, 1, axis=0)).mean(axis=(1, 2, 3)).min() > 3 * JPEG_BOUND
    assert np.abs(images - np.roll(sources, 1, axis=2)).mean(axis=(1, 2, 3)).min() > 2 * JPEG_BOUND


def test_training_labels_and_classes_are_written(converted):
    """train.beton holds every training label in source order; classes.json maps the sorted class names;
    skipped.txt is written and empty."""
    out, made = converted
    train = Reader(str(out / "train.beton"))
    assert train.metadata["f1"].tolist() == [label for _, _, label in made["train"]]
    assert read_classes(out) == {"ant": 0, "bee": 1, "cat": 2}
    assert (out / "skipped.txt").read_text() == ""  # no image was unreadable


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_embedded_digits(tmp_path_factory.mktemp("digits"))


def test_embedded_digits_split_is_stratified_and_fixed():
    """20 % of every class is in val, train and val are disjoint and cover all 1,797 digits, same every call."""
    _, labels = digits_images()
    train, val = stratified_split(labels)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1797
    for digit in range(10):
        share = np.sum(labels[val] == digit) / np.sum(labels == digit)
        assert abs(share - 0.2) < 0.01
    assert np.array_equal(val, stratified_split(labels)[1])


def test_embedded_digits_round_trip_is_exact(digits):
    """The digits are stored raw: read back at 32x32 with a ratio-1 crop they equal the made images."""
    images, labels = digits_images()
    _, val_indices = stratified_split(labels)
    cfg = DataConfig(path=str(digits), val_resolution=32, val_crop_ratio=1.0, batch_size=128, num_workers=1)
    read_images, read_labels = read_back(cfg)
    assert np.array_equal(read_labels, labels[val_indices])
    assert np.abs(read_images - images[val_indices]).max() < 0.01


def test_embedded_digits_are_written_once(digits):
    """A second call finds the completed marker and rewrites nothing."""
    before = {p.name: p.stat().st_mtime_ns for p in digits.iterdir()}
    write_embedded_digits(digits)
    assert {p.name: p.stat().st_mtime_ns for p in digits.iterdir()} == before


def test_training_batches_follow_the_config(digits):
    """Training batches: per-worker batch size, float32 NCHW normalised images at the epoch's (progressive)
    resolution, int64 labels; set_epoch changes the shuffle and len() counts full batches."""
    cfg = DataConfig(
        path=str(digits), batch_size=100, num_workers=1, seed=3,
        progressive={"start_res": 16, "end_res": 32, "start_epoch": 0, "end_epoch": 2, "step": 8},
    )
    train, _ = build_loaders(cfg, rank=0, world_size=1, device=CPU, distributed=False)
    assert len(train) == 1438 // 100
    seen = {}
    for epoch, res in ((0, 16), (1, 24), (2, 32)):
        train.set_epoch(epoch)
        batches = [(x.clone(), y.clone()) for x, y in train]
        x, y = batches[0]
        assert x.shape == (100, 3, res, res) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert len(batches) == len(train)
        seen[epoch] = torch.cat([y for _, y in batches])
    # Normalised with the ImageNet statistics: a black digit background maps to about -mean/std.
    assert x.min() < -1.5 and x.max() > 1.5
    assert not torch.equal(seen[0], seen[1])
    train.set_epoch(1)
    assert torch.equal(torch.cat([y.clone() for _, y in train]), seen[1])

"""The training loader's crops and flips are a function of `data.seed` (`orchestrator.data.seeded_draws`).

numba's random streams are per thread and seeded from the operating system, so without per-image seeds two
loaders with the same seed crop differently, and the same run on two threads differs from one on one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from orchestrator.data.beton import write_beton
from orchestrator.data.config import DataConfig, WriterConfig
from orchestrator.data.loaders import build_train_loader

from .helpers import smooth_image

IMAGES = 48
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def labelled_by_index(tmp_path_factory):
    """48 images of two shapes, two thirds JPEG, each with its own label, so that a batch says which sample
    each image is."""
    rng = np.random.default_rng(5)

    class Images:
        def __len__(self):
            return IMAGES

        def __getitem__(self, index):
            size = 40 if index % 2 else 56
            return smooth_image(rng, size)[:, : size - 8], index

    folder = tmp_path_factory.mktemp("labelled")
    writer = WriterConfig(max_resolution=None, compress_probability=0.67, page_size=2 * 1024 * 1024, workers=1)
    for split in ("train", "val"):
        write_beton(Images(), folder / f"{split}.beton", writer)
    (folder / "classes.json").write_text(json.dumps({str(i): i for i in range(IMAGES)}))
    return folder


def crops_by_sample(folder, *, seed=0, workers=2, epochs=(0,), decode_crop_only=True):
    """{epoch: {sample index: its uint8-exact normalised 24 px crop}} from the project's training loader."""
    cfg = DataConfig(path=str(folder), train_resolution=24, batch_size=8, num_workers=workers, seed=seed,
                     decode_crop_only=decode_crop_only)
    loader = build_train_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    seen = {}
    for epoch in epochs:
        loader.set_epoch(epoch)
        seen[epoch] = {int(label): image.clone() for images, labels in loader
                       for image, label in zip(images, labels)}
        assert len(seen[epoch]) == IMAGES
    return seen


def same(a: dict, b: dict) -> list[bool]:
    return [torch.equal(a[k], b[k]) for k in sorted(a)]


def test_the_same_seed_gives_the_same_crops_and_flips_on_any_number_of_threads(labelled_by_index):
    two_threads = crops_by_sample(labelled_by_index, workers=2, epochs=(0, 1))
    one_thread = crops_by_sample(labelled_by_index, workers=1, epochs=(0, 1))
    again = crops_by_sample(labelled_by_index, workers=2, epochs=(0, 1))
    for epoch in (0, 1):
        assert all(same(two_threads[epoch], one_thread[epoch]))
        assert all(same(two_threads[epoch], again[epoch]))


def test_each_epoch_and_each_seed_draws_afresh(labelled_by_index):
    seen = crops_by_sample(labelled_by_index, epochs=(0, 1))
    other_seed = crops_by_sample(labelled_by_index, seed=1)
    assert sum(same(seen[0], seen[1])) < IMAGES // 4  # a sample is cropped anew every epoch
    assert sum(same(seen[0], other_seed[0])) < IMAGES // 4


def test_whole_and_crop_only_decoding_give_the_same_seeded_batches(labelled_by_index):
    """With the seed fixing the draws, the two decoding paths are compared on real random crops (scale
    0.08-1), not only on a fixed one."""
    assert all(same(crops_by_sample(labelled_by_index, decode_crop_only=True)[0],
                    crops_by_sample(labelled_by_index, decode_crop_only=False)[0]))

"""CPU-ms per image of the training loader's parts, each against the one it replaced, in one process.

    .venv/bin/python bench/loader_parts.py            # 200 ImageNet-like JPEGs, 3 interleaved rounds

- decode + crop + resize to 224: FFCV's whole-image decode against the crop-only decode
  (`orchestrator.data.jpeg_region`), for the training random-resized crop and the validation centre crop;
- flip of a 64-image batch: FFCV's copying `RandomHorizontalFlip` against `RandomHorizontalFlipInPlace`;
- CPU normalisation of a 64-image batch: the two tensor passes against the one numba pass (`NormalizeImages`).

One thread (numba and torch); the JPEGs are made by `bench/loader.py`'s generator and encoded as FFCV's
writer encodes them (OpenCV, quality 90). Figures are the minimum and maximum over the rounds.
"""
from __future__ import annotations

import json
import time

import cv2
import numba
import numpy as np
import torch
from ffcv.fields.rgb_image import get_center_crop, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.transforms import RandomHorizontalFlip

from loader import imagenet_like_image, imagenet_like_size
from orchestrator.data.config import DataConfig
from orchestrator.data.flip import RandomHorizontalFlipInPlace
from orchestrator.data.jpeg_region import decode_jpeg_rows
from orchestrator.data.loaders import NormalizeImages

IMAGES, ROUNDS, BATCH = 200, 3, 64


def jpegs() -> list[tuple[np.ndarray, int, int]]:
    made = []
    for index in range(IMAGES):
        rng = np.random.default_rng(index)
        width, height = imagenet_like_size(rng)
        rgb = np.asarray(imagenet_like_image(rng, width, height))
        made.append((cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].reshape(-1),
                     height, width))
    return made


def decode_ms(images, crop, crop_only: bool) -> float:
    scratch, out = np.zeros(500 * 500 * 3, np.uint8), np.zeros((224, 224, 3), np.uint8)
    np.random.seed(0)
    start = time.process_time()
    for data, height, width in images:
        top, left, h, w = crop(height, width)
        if crop_only:  # as the loader does: the resize reads the window inside the decoded rows
            _, first, span = decode_jpeg_rows(data, scratch, top, left, h, w)
            resize_crop(scratch[: h * span * 3].reshape(h, span, 3), 0, h, first, first + w, out)
        else:
            imdecode(data, scratch, height, width, height, width, 0, 0, 1, 1, False, False)
            resize_crop(scratch[: height * width * 3].reshape(height, width, 3), top, top + h, left, left + w, out)
    return (time.process_time() - start) / len(images) * 1e3


def per_image_ms(call, repeats: int = 10) -> float:
    call()  # compiled and warm
    start = time.process_time()
    for _ in range(repeats):
        call()
    return (time.process_time() - start) / (repeats * BATCH) * 1e3


def main() -> None:
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    images = jpegs()
    random_crop = lambda h, w: get_random_crop(h, w, np.array((0.08, 1.0)), np.array((3 / 4, 4 / 3)))  # noqa: E731
    centre_crop = lambda h, w: get_center_crop(h, w, None, 224 / 256)  # noqa: E731

    batch = np.random.default_rng(0).integers(0, 256, (BATCH, 224, 224, 3), dtype=np.uint8)
    copying_flip = numba.njit(RandomHorizontalFlip(0.5).generate_code())
    in_place_flip = numba.njit(RandomHorizontalFlipInPlace(0.5).generate_code())
    flipped_into = np.empty_like(batch)
    sample_indices = np.arange(BATCH, dtype=np.uint64)  # the in-place flip takes them (FFCV's with_indices)
    uint8_nchw = torch.from_numpy(batch).permute(0, 3, 1, 2)
    cfg = DataConfig(path="unused")
    two_passes, one_pass = NormalizeImages(cfg, numba_on_cpu=False), NormalizeImages(cfg)

    rounds: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        figures = {
            "random-resized crop, whole decode": decode_ms(images, random_crop, False),
            "random-resized crop, crop-only decode": decode_ms(images, random_crop, True),
            "centre crop, whole decode": decode_ms(images, centre_crop, False),
            "centre crop, crop-only decode": decode_ms(images, centre_crop, True),
            "flip, FFCV's copy": per_image_ms(lambda: copying_flip(batch, flipped_into)),
            "flip, in place": per_image_ms(lambda: in_place_flip(batch, None, sample_indices)),
            "normalise, two tensor passes": per_image_ms(lambda: two_passes(uint8_nchw)),
            "normalise, one numba pass": per_image_ms(lambda: one_pass(uint8_nchw)),
        }
        for name, value in figures.items():
            rounds.setdefault(name, []).append(value)
    print(json.dumps({name: [round(min(v), 3), round(max(v), 3)] for name, v in rounds.items()}, indent=2))


if __name__ == "__main__":
    main()

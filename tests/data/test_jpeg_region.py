"""Decoding only the crop of a JPEG (`orchestrator.data.jpeg_region`) gives the pixels of a whole decode.

The claim is exact: libjpeg decodes the window with the same DCT and the same upsampling as a whole-image
decode, so every byte must match FFCV's own decoder; no tolerance is needed or allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.loader import Loader, OrderOption
from ffcv.transforms import ToTensor

from orchestrator.data.beton import IMAGE_FIELD, LABEL_FIELD, write_beton
from orchestrator.data.config import DataConfig, WriterConfig
from orchestrator.data.errors import DataError
from orchestrator.data.jpeg_region import (CACHE_DIR_VARIABLE, RegionDecodingCenterCrop, RegionDecodingRandomResizedCrop,
                                           build_library, decode_jpeg_region, decode_jpeg_rows)
from orchestrator.data.loaders import build_val_loader

from .helpers import break_jpeg_headers, smooth_image

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def textured(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour blobs plus noise: chroma varies from pixel to pixel, so that a window whose chroma
    upsampling treated its own edges as the image's differs at those edges."""
    base = cv2.resize(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(base.astype(np.int16) + rng.integers(-25, 26, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, *extra: int) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90, *extra])
    assert ok
    return data.reshape(-1)


def whole_decode(data: np.ndarray, height: int, width: int) -> np.ndarray:
    """FFCV's decoder: the whole image, at its own DCT settings."""
    out = np.zeros(height * width * 3, np.uint8)
    imdecode(data, out, height, width, height, width, 0, 0, 1, 1, False, False)
    return out.reshape(height, width, 3)


ENCODINGS = {
    "4:2:0": (),  # the chroma subsampling of the .beton files (FFCV encodes with OpenCV's defaults)
    "4:4:4": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444),
    "4:2:2": (cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422),
    "progressive 4:2:0": (cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_window_is_the_same_pixels_as_a_whole_decode(encoding):
    """Windows at the four corners, along every edge, the whole image, single pixels and rows, and random
    ones, of an image whose sides are not multiples of the 16-pixel MCU."""
    rng = np.random.default_rng(7)
    height, width = 139, 181
    data = jpeg(textured(rng, height, width), *ENCODINGS[encoding])
    whole = whole_decode(data, height, width)
    windows = [(0, 0, height, width), (0, 0, 1, 1), (height - 1, width - 1, 1, 1), (0, width - 37, 50, 37),
               (height - 20, 0, 20, 61), (17, 33, 1, 100), (40, 1, 90, 1), (5, 16, 100, 32), (16, 15, 33, 18)]
    for _ in range(40):
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        windows.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
    for top, left, h, w in windows:
        window = np.full((h, w, 3), 77, np.uint8)
        assert decode_jpeg_region(data, window, top, left) == 0
        assert np.array_equal(window, whole[top:top + h, left:left + w]), (top, left, h, w)


def test_bytes_that_are_no_jpeg_and_windows_off_the_image_are_refused():
    """-1 and a zero-filled window, never stale memory in a batch."""
    rng = np.random.default_rng(1)
    data = jpeg(textured(rng, 40, 50))
    window = np.full((10, 10, 3), 200, np.uint8)
    assert decode_jpeg_region(rng.integers(0, 256, 4000, dtype=np.uint8), window, 0, 0) == -1
    assert not window.any()
    window[:] = 200
    assert decode_jpeg_region(data, window, 35, 0) == -1  # rows 35..44 of a 40-row image
    assert not window.any()
    window[:] = 200
    assert decode_jpeg_region(data, window, 0, 45) == -1  # columns 45..54 of a 50-column image
    assert not window.any()



def test_rows_are_decoded_in_place_and_never_past_the_buffer():
    """The loader's form: whole rows, from an iMCU edge, each `span` wide, with the window at column `first`
    (no second copy). A buffer too small for the rows gets -1 and a zeroed window, and nothing written past it."""
    rng = np.random.default_rng(3)
    height, width = 70, 90
    data = jpeg(textured(rng, height, width))
    whole = whole_decode(data, height, width)
    top, left, h, w = 11, 37, 30, 20
    rows = np.full(h * width * 3 + 64, 9, np.uint8)
    status, first, span = decode_jpeg_rows(data, rows, top, left, h, w)
    assert status == 0 and w + 2 <= span <= width and first <= left and first + w < span
    window = rows[: h * span * 3].reshape(h, span, 3)[:, first:first + w]
    assert np.array_equal(window, whole[top:top + h, left:left + w])
    assert (rows[h * span * 3:] == 9).all()  # the rest of the buffer is untouched

    small = np.full(h * (w + 2) * 3 + 16, 9, np.uint8)  # room for the window, not for iMCU-aligned rows
    guard = np.full(64, 9, np.uint8)
    buffer = np.concatenate([small, guard])
    assert decode_jpeg_rows(data, buffer[: small.size], top, left, h, w) == (-1, 0, w)
    assert not buffer[: h * w * 3].any() and (buffer[small.size:] == 9).all()


SHAPES = [(61, 90), (97, 64), (50, 50), (83, 121), (120, 47)]


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """A data folder of 40 images of several shapes, about 70 % JPEG and the rest raw, as train and val."""
    rng = np.random.default_rng(3)

    class Images:
        def __len__(self):
            return 40

        def __getitem__(self, index):
            h, w = SHAPES[index % len(SHAPES)]
            return (textured(rng, h, w) if index % 3 else smooth_image(rng, h)[:, :1].repeat(w, 1)), index % 4

    folder = tmp_path_factory.mktemp("mixed")
    writer = WriterConfig(max_resolution=None, compress_probability=0.7, page_size=2 * 1024 * 1024, workers=1)
    for split in ("train", "val"):
        write_beton(Images(), folder / f"{split}.beton", writer)
    (folder / "classes.json").write_text(json.dumps({str(i): i for i in range(4)}))
    return folder


@pytest.mark.parametrize("decoders", [(RandomResizedCropRGBImageDecoder, RegionDecodingRandomResizedCrop),
                                      (CenterCropRGBImageDecoder, RegionDecodingCenterCrop)],
                         ids=["random-resized crop", "centre crop"])
def test_loader_batches_equal_those_of_ffcv_whole_image_decoder(mixed_data, decoders):
    """Through FFCV's loader, JPEG and raw images of several shapes, two worker threads: the two decoders hand
    out the same batches, byte for byte. The random-resized crop is asked for the whole area at aspect 1,
    which never fits a non-square image, so both fall back to the same centre crop."""
    options = {"scale": (1, 1), "ratio": (1, 1)} if decoders[0] is RandomResizedCropRGBImageDecoder else {"ratio": 0.8}

    def batches(decoder_class):
        loader = Loader(str(mixed_data / "train.beton"), batch_size=8, num_workers=2, order=OrderOption.SEQUENTIAL,
                        pipelines={IMAGE_FIELD: [decoder_class((32, 32), **options), ToTensor()], LABEL_FIELD: None})
        return torch.cat([images.clone() for (images,) in loader])

    whole, region = (batches(d) for d in decoders)
    assert whole.shape == (40, 32, 32, 3) and whole.float().std() > 10  # real images, not a blank batch
    assert torch.equal(region, whole)


def test_validation_loader_decodes_only_the_crop_and_reads_the_same(mixed_data):
    """`build_val_loader` uses the centre crop that decodes only its window unless `decode_crop_only` is off,
    and the two read the same normalised batches."""
    def read(decode_crop_only):
        cfg = DataConfig(path=str(mixed_data), val_resolution=32, batch_size=16, num_workers=2,
                         decode_crop_only=decode_crop_only)
        loader = build_val_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"))
        return torch.cat([x.clone() for x, _ in loader]), type(loader.loader.pipeline_specs[IMAGE_FIELD].decoder)

    (region, region_decoder), (whole, whole_decoder) = read(True), read(False)
    assert (region_decoder, whole_decoder) == (RegionDecodingCenterCrop, CenterCropRGBImageDecoder)
    assert region.shape == (40, 3, 32, 32) and torch.equal(region, whole)


def test_a_machine_without_a_compiler_is_told_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(DataError, match="needs a C compiler.*decode_crop_only: false"):
        build_library()


def test_a_failed_build_says_so_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'fatal error: jpeglib.h: No such file or directory' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(failing))
    with pytest.raises(DataError, match="jpeglib.h: No such file.*apt-get install libjpeg-dev"):
        build_library()
    assert list((tmp_path / "cache").iterdir()) == []  # the next try builds afresh
    monkeypatch.delenv("CC")
    built = build_library()  # with the machine's compiler, into the same folder
    assert built.parent == tmp_path / "cache" and built.stat().st_size > 0


@pytest.mark.parametrize("decode_crop_only", [True, False])
def test_training_loader_follows_the_switch(mixed_data, decode_crop_only):
    from orchestrator.data.loaders import build_train_loader

    cfg = DataConfig(path=str(mixed_data), train_resolution=32, batch_size=8, num_workers=1,
                     decode_crop_only=decode_crop_only)
    train = build_train_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    decoder = train.loader.pipeline_specs[IMAGE_FIELD].decoder
    assert type(decoder) is RegionDecodingRandomResizedCrop and decoder.crop_only is decode_crop_only
    images, labels = next(iter(train))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and images.std() > 0.1


def test_with_the_switch_off_a_machine_without_a_compiler_still_trains(mixed_data, tmp_path):
    """What the build error tells the user to do must work: with `decode_crop_only: false`, the training and
    validation loaders neither build nor load the C helper, so a fresh process with no compiler on its PATH
    and an empty helper cache reads batches."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from orchestrator.data.config import DataConfig
from orchestrator.data.loaders import build_loaders
cfg = DataConfig(path={str(mixed_data)!r}, train_resolution=16, val_resolution=16, batch_size=8, num_workers=1,
                 decode_crop_only=False)
train, val = build_loaders(cfg, rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
train.set_epoch(0)
print(next(iter(train))[0].shape[0], next(iter(val))[0].shape[0])
"""
    env = {**os.environ, "PATH": str(tmp_path / "empty"), CACHE_DIR_VARIABLE: str(tmp_path / "native")}
    env.pop("CC", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["8", "8"]
    assert not (tmp_path / "native").exists()  # nothing was built


@pytest.mark.parametrize("decode_crop_only", [True, False])
def test_a_jpeg_damaged_after_writing_stops_the_epoch_with_a_data_error(mixed_data, tmp_path, decode_crop_only):
    """libjpeg refusing an image used to leave a black crop in the batch, and training went on silently; now
    the batch raises, and the epoch ends with a DataError that says the file was damaged. The header of every
    JPEG in a copy of the training file is broken, so the first batch holds one whichever images it draws; two
    decoding threads, so the error leaves numba's parallel loop."""
    import shutil

    from orchestrator.data.loaders import build_train_loader

    data = tmp_path / "data"
    shutil.copytree(mixed_data, data)
    assert break_jpeg_headers(data / "train.beton") >= 20
    cfg = DataConfig(path=str(data), train_resolution=16, batch_size=8, num_workers=2,
                     decode_crop_only=decode_crop_only)
    train = build_train_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    with pytest.raises(DataError, match=r"ValueError: a JPEG image in the \.beton does not decode: the file was "
                                        r"damaged after it was written\), so the epoch cannot go on"):
        next(iter(train))

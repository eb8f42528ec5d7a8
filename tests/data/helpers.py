"""Small image trees and data folders that the data tests make for themselves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PREPARE_DATA = REPO / "pipelines" / "prepare_data.py"


def load_prepare_data():
    """The CLI module `pipelines/prepare_data.py` (pipelines/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("prepare_data", PREPARE_DATA)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def smooth_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An 8x8 random grey grid blown up bilinearly, with a random tint: smooth enough for JPEG (chroma is
    constant, so its subsampling costs nothing), distinct enough that a swap or a one-pixel shift shows as a
    large pixel error."""
    grid = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    luminance = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR)).astype(np.int64)
    tint = rng.integers(-40, 40, 3)
    return np.clip(luminance[:, :, None] * 7 // 10 + 40 + tint, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, classes=("ant", "bee", "cat"), per_class={"train": 4, "val": 3}, seed=0):
    """ImageFolder tree of (lossless) PNG files; returns {split: [(path, image array, label)]} in sorted order."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, count in per_class.items():
        made[split] = []
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = smooth_image(rng)
                path = folder / f"{i:03d}.png"
                Image.fromarray(image).save(path)
                made[split].append((path, image, label))
    return made


class IndexedPairs:
    """(image, label) pairs whose label is the sample's own index, so a loader's labels name the samples."""

    def __init__(self, count: int, size: int = 8):
        self.count, self.size = count, size

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return np.full((self.size, self.size, 3), index % 256, dtype=np.uint8), index


def make_indexed_data_folder(out: Path, *, train: int, val: int) -> Path:
    """A data folder whose training and validation labels are the sample indices."""
    from orchestrator.data.beton import write_beton
    from orchestrator.data.config import WriterConfig

    out.mkdir(parents=True, exist_ok=True)
    writer = WriterConfig(max_resolution=None, page_size=2 * 1024 * 1024, workers=1)
    write_beton(IndexedPairs(train), out / "train.beton", writer, write_mode="raw")
    write_beton(IndexedPairs(val), out / "val.beton", writer, write_mode="raw")
    (out / "classes.json").write_text(json.dumps({str(i): i for i in range(max(train, val))}))
    return out


def break_jpeg_headers(beton: Path, every: int = 1) -> int:
    """Overwrite the start-of-image marker of every `every`-th JPEG stored in `beton` (libjpeg then refuses it:
    "Not a JPEG file"), as damage after writing would; returns how many JPEGs the file holds."""
    data = bytearray(beton.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    for start in starts[::every]:
        data[start:start + 2] = b"\x00\x00"
    beton.write_bytes(bytes(data))
    return len(starts)

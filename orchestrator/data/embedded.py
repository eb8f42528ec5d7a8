"""The embedded data set: scikit-learn's 1,797 handwritten digits, shipped inside its wheel (no download).

Each 8x8 grey-level digit (values 0-16) becomes a 32x32 RGB image (grey replicated in three channels, the
layout every `.beton` uses), and a fixed stratified split keeps 20 % of every class for validation. The
images are stored raw (no JPEG), so what a loader reads back is exactly what was made here.

`write_embedded_digits(out_dir)` is idempotent: a `.complete` marker, written last, says that the folder
holds the whole data set, and later calls return at once. A file lock lets parallel callers (Ray workers,
tests) share one folder.
"""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator import atomic

from .beton import ensure_writable_folder, write_beton, write_json
from .config import WriterConfig

RESOLUTION = 32
VAL_FRACTION = 0.2
SPLIT_SEED = 0
MARKER = ".complete"
FORMAT_VERSION = 1


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All digits as (N, 32, 32, 3) uint8 images and (N,) int64 labels, in scikit-learn's order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack(
        [
            np.asarray(
                Image.fromarray(g, mode="L").resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR).convert("RGB")
            )
            for g in grey
        ]
    )
    return images, digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, *, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED):
    """Sorted train and val indices with `val_fraction` of every class in val (fixed by `seed`)."""
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        val.extend(rng.permutation(members)[: int(round(val_fraction * len(members)))])
    val = np.sort(np.array(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


class _Pairs:
    """Indexable (image, label) pairs for FFCV's writer."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def _expected_marker(train: int, val: int) -> dict:
    return {"dataset": "digits", "format_version": FORMAT_VERSION, "resolution": RESOLUTION, "train": train, "val": val}


def _is_complete(out: Path) -> bool:
    marker = out / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    files = ("train.beton", "val.beton", "classes.json")
    return recorded.get("format_version") == FORMAT_VERSION and all((out / f).is_file() for f in files)


def write_embedded_digits(out_dir: str | Path, *, page_size: int = 2 * 1024 * 1024) -> Path:
    """Write the digits as `train.beton`, `val.beton` and `classes.json` in `out_dir` unless already there."""
    out = Path(out_dir)
    if _is_complete(out):
        return out
    ensure_writable_folder(out)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(out):  # another process finished it while we waited
            return out
        (out / MARKER).unlink(missing_ok=True)
        atomic.remove_stale(out)  # what a killed writer left (`*.tmp-<pid>`)
        images, labels = digits_images()
        train, val = stratified_split(labels)
        # One worker: starting more processes costs more than writing 1,797 tiny images.
        writer = WriterConfig(max_resolution=None, page_size=page_size, workers=1)
        for name, indices in (("train", train), ("val", val)):
            write_beton(_Pairs(images[indices], labels[indices]), out / f"{name}.beton", writer,
                        write_mode="raw", desc=f"digits {name}")
        write_json(out / "classes.json", {str(digit): digit for digit in range(10)})
        write_json(out / MARKER, _expected_marker(len(train), len(val)))
    return out

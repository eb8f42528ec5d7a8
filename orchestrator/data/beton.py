"""Writing one `.beton` file safely: a temporary name first, the final name only once it is complete.

A conversion that stops half-way (Ctrl-C, a crash, a full disk) therefore never leaves a `.beton` under
its final name that a loader would later read as a short or corrupt data set.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator

import ffcv.writer
from ffcv.fields import IntField, RGBImageField
from tqdm import tqdm

from orchestrator import atomic

from .config import WriterConfig
from .errors import DataError

IMAGE_FIELD = "image"
LABEL_FIELD = "label"


temporary_name = atomic.temporary_name  # same folder, never ending in `.beton`, unique per process


def ensure_writable_folder(out: str | Path) -> Path:
    """Create `out` if needed and prove a file can be written there, or fail with one sentence."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DataError(
            f"Cannot write to the output folder {out} ({error.strerror or error}); choose a folder you can "
            "write to with --out."
        ) from None
    return out


def write_atomically(final: Path, content: str) -> None:
    """Small text files (classes.json, markers) get the same temp-then-rename guarantee."""
    atomic.write_text(final, content)


def write_json(final: Path, data: Any) -> None:
    write_atomically(final, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def _progress_in_images(desc: str) -> Iterator[None]:
    # FFCV's writer draws a bare tqdm bar; name it and count in images so the rate reads as images/s.
    original = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(tqdm, desc=desc, unit="img")
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def _stop_writer_processes() -> None:
    # FFCV's worker processes are not daemons: after an interruption the interpreter would wait for them.
    # Each is waited for until it is gone: on a loaded machine one may take longer than the grace period to
    # exit, and it must not outlive the conversion that started it.
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
            child.join()


def write_beton(
    dataset: Any,
    final: str | Path,
    writer: WriterConfig,
    *,
    write_mode: str = "proportion",
    desc: str = "writing",
) -> Path:
    """Write an indexable of (HxWx3 uint8 image, int label) pairs to `final`, atomically.

    `write_mode` is FFCV's: "proportion" (JPEG with `writer.compress_probability`, else raw pixels),
    "jpg" or "raw".
    """
    final = Path(final)
    fields = {
        IMAGE_FIELD: RGBImageField(
            write_mode=write_mode,
            max_resolution=writer.max_resolution,
            jpeg_quality=writer.jpeg_quality,
            compress_probability=writer.compress_probability,
        ),
        LABEL_FIELD: IntField(),
    }
    workers = max(1, min(writer.workers, len(dataset) // 100 or 1))
    try:
        with atomic.atomic_path(final) as temporary:
            with _progress_in_images(desc):
                ffcv.writer.DatasetWriter(
                    str(temporary), fields, page_size=writer.page_size, num_workers=workers
                ).from_indexed_dataset(dataset, chunksize=100)
            failures = getattr(dataset, "failures", None)
            if failures is not None and failures.value:
                raise DataError(
                    f"{failures.value} images of {final.name} could not be read while writing although they "
                    "passed the check before; make sure the source folder does not change during the conversion."
                )
    except BaseException:
        _stop_writer_processes()
        raise
    return final

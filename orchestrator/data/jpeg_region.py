"""Image decoders that decode only the crop's window of each JPEG: the training loader's random-resized crop
and the validation loader's centre crop.

FFCV's `ResizedCropRGBImageDecoder`s decode a whole JPEG and then crop it; these draw the crop first (the
same draw, from the same random stream) and have libjpeg decode just that window (`jpeg_region.c`), so the
batches are the same pixels for less CPU time. Raw images take FFCV's path. With `crop_only=False` they
decode whole JPEGs as FFCV does; with a `seed`, the training crop is drawn reproducibly (`seeded_draws`).

The C helper is built on first use with the machine's C compiler against the system libjpeg (libjpeg-turbo
>= 1.5), into a cache folder shared by every process of the machine, keyed by the source's hash. Several
processes may build it at once: each writes a private file and renames it into place.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

from .errors import DataError
from .seeded_draws import CROP_DRAWS, batch_key, seed_image_draws

SOURCE = Path(__file__).with_name("jpeg_region.c")
CACHE_DIR_VARIABLE = "BITMIXER_NATIVE_CACHE"
# What a batch raises for a JPEG that libjpeg refuses (the writer encoded every one itself, so the file was
# damaged since); `epoch_batches` turns it into a DataError.
UNDECODABLE = "a JPEG image in the .beton does not decode: the file was damaged after it was written"


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "bitmixer" / "native")


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    raise DataError(
        "Decoding only the crop of each JPEG needs a C compiler and none was found (tried $CC, cc, gcc); "
        "install gcc and libjpeg's headers (Debian, Ubuntu: apt-get install gcc libjpeg-dev) or set "
        "data.decode_crop_only: false."
    )


def build_library() -> Path:
    """The compiled helper's path, building it first if this machine has not."""
    source = SOURCE.read_bytes()
    target = _cache_dir() / f"jpeg_region-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = _compiler()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", str(SOURCE), "-ljpeg", "-o", str(built)],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            said = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise DataError(
                f"Could not build the JPEG region decoder ({compiler}: {said}); install libjpeg's headers "
                "(Debian, Ubuntu: apt-get install libjpeg-dev) or set data.decode_crop_only: false."
            )
        os.replace(built, target)
    return target


# The ctypes function, bound before anything calls or compiles `decode_jpeg_region`. A module global, not a
# closure value: numba then compiles the call without trying to put the pointer in its on-disk cache key.
_decode_region_c = None


def _bind_library() -> None:
    global _decode_region_c
    if _decode_region_c is None:
        function = ctypes.CDLL(str(build_library())).decode_jpeg_region
        function.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                             *4 * [ctypes.c_uint32], ctypes.c_void_p]
        function.restype = ctypes.c_int
        _decode_region_c = function


def _decode_rows(source, rows, top, left, height, width, placement):
    return _decode_region_c(source.ctypes.data, source.size, rows.ctypes.data, rows.size,
                            top, left, height, width, placement.ctypes.data)


def decode_jpeg_rows(source: np.ndarray, rows: np.ndarray, top: int, left: int, height: int, width: int,
                     ) -> tuple[int, int, int]:
    """Decode rows [top, top + height) of the JPEG bytes in `source` into the flat uint8 buffer `rows`, each
    row `span` pixels wide, with the window's columns [left, left + width) starting at column `first` of each
    row; returns (status, first, span): status 0 on success, -1 (and a zero-filled height x width window)
    when the bytes are not a decodable JPEG or the window leaves the image or does not fit in `rows`."""
    _bind_library()
    placement = np.zeros(2, np.uint32)
    status = _decode_rows(source, rows, top, left, height, width, placement)
    return status, int(placement[0]), int(placement[1])


def decode_jpeg_region(source: np.ndarray, destination: np.ndarray, top: int, left: int) -> int:
    """Decode the window of `destination`'s shape (height, width, 3) at (top, left) of the JPEG bytes in
    `source`; 0 on success, -1 (and a zero-filled window) when the bytes are not a decodable JPEG."""
    height, width = destination.shape[:2]
    rows = np.empty(height * (width + 64) * 3, np.uint8)  # the rows' widening is at most 2 iMCUs (<= 64 px)
    status, first, span = decode_jpeg_rows(source, rows, top, left, height, width)
    destination[:] = rows[: height * span * 3].reshape(height, span, 3)[:, first:first + width]
    return status


def _no_region_decoder(source, rows, top, left, height, width, placement):
    """What a decoder built with `crop_only=False` compiles in place of the C helper (which it neither
    builds nor calls), so that its code types without it."""
    return -1


class RegionDecoding:
    """Mixed into one of FFCV's resized-crop decoders: its crop (`get_crop_generator`) and its resize, with
    the crop drawn before anything is decoded, so that only the crop's rows of a JPEG are (`crop_only`, the
    default; False decodes whole images, as FFCV does). With a `seed`, each image's draws are seeded on their
    own (`seeded_draws`): the same seed gives the same crops on any number of threads. A JPEG that does not
    decode raises (`UNDECODABLE`) where FFCV would leave a black image."""

    def __init__(self, *args, seed: int | None = None, crop_only: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.crop_only = seed, crop_only

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        read = self.memory_read
        each = Compiler.get_iterator()
        crop_only, seeded, seed = self.crop_only, self.seed is not None, self.seed or 0
        if crop_only:
            _bind_library()
        decode_rows = Compiler.compile(_decode_rows if crop_only else _no_region_decoder)
        decode_whole = Compiler.compile(imdecode)
        resize = Compiler.compile(resize_crop)
        draw_crop = Compiler.compile(self.get_crop_generator)
        # FFCV's crop generators take arrays for ranges and plain numbers otherwise (the centre crop's ratio).
        scale, ratio = (np.array(v) if isinstance(v, tuple) else v for v in (self.scale, self.ratio))

        def decode(batch_indices, storage, metadata, storage_state):
            destination, scratch = storage
            key = batch_key(seed, batch_indices) if seeded else np.uint64(0)
            for slot in each(len(batch_indices)):
                sample = batch_indices[slot]
                field = metadata[sample]
                data = read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if seeded:
                    seed_image_draws(key, sample, CROP_DRAWS)
                top, left, crop_height, crop_width = draw_crop(height, width, scale, ratio)
                if field["mode"] == jpg and crop_only:
                    placement = np.empty(2, np.uint32)  # (first column of the window, row width)
                    if decode_rows(data, scratch[slot], top, left, crop_height, crop_width, placement) != 0:
                        raise ValueError(UNDECODABLE)
                    first, span = placement[0], placement[1]
                    rows = scratch[slot][: crop_height * span * 3].reshape(crop_height, span, 3)
                    resize(rows, 0, crop_height, first, first + crop_width, destination[slot])
                else:
                    if field["mode"] == jpg:
                        if decode_whole(data, scratch[slot], height, width, height, width, 0, 0, 1, 1, False,
                                        False) != 0:
                            raise ValueError(UNDECODABLE)
                        image = scratch[slot][: height * width * 3].reshape(height, width, 3)
                    else:
                        image = data.reshape(height, width, 3)
                    resize(image, top, top + crop_height, left, left + crop_width, destination[slot])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class RegionDecodingRandomResizedCrop(RegionDecoding, RandomResizedCropRGBImageDecoder):
    """FFCV's random-resized crop (same crop draw, same resize), decoding only the crop of a JPEG, each
    image's draw seeded on its own when given a `seed`."""


class RegionDecodingCenterCrop(RegionDecoding, CenterCropRGBImageDecoder):
    """FFCV's centre crop (`ratio` of the shorter side, then the resize), decoding only the crop of a JPEG."""

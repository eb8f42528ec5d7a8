"""FFCV training and validation loaders over a data folder (`train.beton`, `val.beton`, `classes.json`).

Build them once per worker and reuse them every epoch (each FFCV loader compiles its pipeline with numba,
about 12 s on 2 cores):

    train, val = build_loaders(cfg, rank=rank, world_size=world_size, device=device, distributed=True)
    for epoch in range(start_epoch, epochs):
        train.set_epoch(epoch)               # shuffle and (progressive) resolution of this epoch
        for images, labels in train: ...     # float32 NCHW normalised, int64 labels, on `device`
        for images, labels in val: ...       # this rank's shard of the validation set

Training (`TrainLoader`): random-resized crop to `cfg.resolution_for(epoch)`, horizontal flip,
normalisation, each image's crop and flip drawn from a seed of its own (`seeded_draws`: `cfg.seed`, the batch,
the sample), so the same seed gives the same batches on any number of threads; `batch_size // world_size` images per worker, incomplete last batch dropped. With
`distributed=True` (inside Ray Train, whose process group already exists: nothing here spawns or initialises
anything) FFCV shards each epoch's seeded permutation like PyTorch's DistributedSampler, which pads the
permutation to a multiple of `world_size` by repeating its first few indices.

Validation (`ValLoader`): resize-then-centre-crop (`cfg.val_crop_ratio`, 224/256 for ImageNet), sequential
order, last batch kept. Rank r reads the r-th contiguous block of `np.array_split(range(N), world_size)`
through FFCV's `indices=` rather than FFCV's distributed sampler, whose padding would count a few images
twice: every validation image is read by exactly one rank, so counts all-reduced over ranks cover the
validation set exactly once.

FFCV hands out uint8 batches: each JPEG decoded only inside its crop window (`jpeg_region`), resized
straight to the final size, flipped in place (`flip`), as an NCHW view of FFCV's NHWC buffer (no copy).
`NormalizeImages` turns them into float32 normalised images where they are consumed. On CUDA the uint8
batch moves with `non_blocking=True` inside the FFCV pipeline and is normalised on the GPU in two tensor
passes; on CPU it is normalised in the training process, in one pass of a numba loop. The result is
channels-last when `cfg.channels_last`, contiguous NCHW otherwise. Batches are reused buffers on CPU (FFCV's,
then a small ring of normalised ones): `.clone()` anything kept past the
next iteration. The CUDA path has not been run on a GPU in this repository yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numba
import numpy as np
import torch

from .compile_cache import enable_compile_cache

# Every process that builds a loader (a Train worker, the final model's Table 6 search and plots in a stage
# task, the deploy CLI) loads FFCV's numba code from the on-disk cache instead of compiling it (~8 CPU-s for
# a validation loader on 2 cores); it must be on before FFCV is imported.
enable_compile_cache()

from ffcv.fields.basics import IntDecoder  # noqa: E402
from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder  # noqa: E402
from ffcv.loader import Loader, OrderOption  # noqa: E402
from ffcv.reader import Reader  # noqa: E402
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage  # noqa: E402

from .beton import IMAGE_FIELD, LABEL_FIELD  # noqa: E402
from .config import DataConfig  # noqa: E402
from .epoch import epoch_batches  # noqa: E402
from .errors import DataError  # noqa: E402
from .flip import RandomHorizontalFlipInPlace  # noqa: E402
from .jpeg_region import RegionDecodingCenterCrop, RegionDecodingRandomResizedCrop  # noqa: E402
from .folder import DATA_FILES, check_data_folder  # noqa: E402, F401 (re-exported)


def read_classes(path: str | Path) -> dict[str, int]:
    """Class name -> label index, from `classes.json` in the data folder."""
    return check_data_folder(path)


def _image_tail(device: torch.device) -> list:
    """Everything after the decoder (and flip): the uint8 batch as an NCHW view of FFCV's NHWC buffer
    (channels-last in memory, no copy); on CUDA it moves to the GPU first, as uint8 (4x less traffic than
    float32). Normalisation is not FFCV's: `NormalizeImages` does it where the batch is consumed."""
    if device.type == "cuda":
        return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)]
    return [ToTensor(), ToTorchImage(channels_last=True)]


@numba.njit(parallel=True, cache=True)
def _normalise_to_planes(source, destination, scale, shift):
    """destination[n, c, i] = source[n, i, c] * scale[c] + shift[c] for pixel i: uint8 NHWC in, float32 NCHW
    out, both C-contiguous. One image per parallel step; the three channels of a pixel are unrolled so that
    the compiler vectorises the loop (a loop over channels inside, or strided views, keep it scalar: 2.6x
    slower)."""
    images, height, width, channels = source.shape
    a0, a1, a2 = scale[0], scale[1], scale[2]
    b0, b1, b2 = shift[0], shift[1], shift[2]
    for n in numba.prange(images):
        pixels = source[n].reshape(height * width * channels)
        planes = destination[n].reshape(channels, height * width)
        for i in range(height * width):
            planes[0, i] = np.float32(pixels[3 * i]) * a0 + b0
            planes[1, i] = np.float32(pixels[3 * i + 1]) * a1 + b1
            planes[2, i] = np.float32(pixels[3 * i + 2]) * a2 + b2


@numba.njit(parallel=True, cache=True)
def _normalise_to_pixels(source, destination, scale, shift):
    """As `_normalise_to_planes`, into a C-contiguous NHWC destination (channels-last)."""
    images, height, width, channels = source.shape
    a0, a1, a2 = scale[0], scale[1], scale[2]
    b0, b1, b2 = shift[0], shift[1], shift[2]
    for n in numba.prange(images):
        pixels = source[n].reshape(height * width * channels)
        values = destination[n].reshape(height * width * channels)
        for i in range(height * width):
            values[3 * i] = np.float32(pixels[3 * i]) * a0 + b0
            values[3 * i + 1] = np.float32(pixels[3 * i + 1]) * a1 + b1
            values[3 * i + 2] = np.float32(pixels[3 * i + 2]) * a2 + b2


class NormalizeImages:
    """uint8 NCHW batch (channels-last in memory, as `_image_tail` hands it out) -> float32
    (x - 255 mean) / (255 std), channels-last or contiguous NCHW as `cfg.channels_last` asks, on the batch's
    own device: the GPU on CUDA, the training process on CPU.

    On CPU it is one pass of a numba loop (`_normalise_to_planes`, `_normalise_to_pixels`: read a pixel,
    convert, multiply-add, store where the output's layout wants it), with at most torch's thread count; the
    output lives in a ring of `buffers` reused batches, like FFCV's own (a fresh ~40 MB tensor per batch
    costs more in page faults than the arithmetic): a batch stays valid for `buffers - 1` more iterations;
    `.clone()` anything kept past the next one. On CUDA it is two tensor passes, a converting copy (which also transposes when
    contiguous NCHW is asked for) and one in-place x * (1 / (255 std)) + (-mean / std) with the per-channel
    constants laid out along the output's innermost memory dimension; each batch is a fresh tensor there (the
    caching allocator makes that free).

    Both compute fl(fl(x a) + b) with a = fl(1 / (255 std)), b = fl(-mean / std). Against FFCV's former CPU
    normalisation (a float32 lookup table computed in float64) every value differs by at most a few float32
    roundings: see tests/data/test_normalisation.py for the bound.
    """

    def __init__(self, cfg: DataConfig, buffers: int = 3, *, numba_on_cpu: bool = True):
        # numba_on_cpu=False: the two tensor passes on CPU as well (the former CPU path; what the GPU runs).
        self.numba_on_cpu = numba_on_cpu
        mean = torch.tensor(cfg.mean, dtype=torch.float64)
        std = torch.tensor(cfg.std, dtype=torch.float64)
        self.scale = (1 / (255 * std)).to(torch.float32)
        self.shift = (-mean / std).to(torch.float32)
        self.channels_last = cfg.channels_last
        self.buffers = buffers
        self._ring: list[torch.Tensor] = []
        self._next = 0
        self._rows: dict = {}  # (device, repeats, plane) -> (scale, shift) laid out along one row of the output

    def _output(self, images: torch.Tensor) -> torch.Tensor:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        if images.device.type != "cpu":
            return torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=memory_format)
        slot = self._next % self.buffers
        self._next += 1
        if len(self._ring) <= slot:
            self._ring.append(torch.empty(0))
        if self._ring[slot].shape != images.shape:  # first use, a progressive resolution step, a short batch
            self._ring[slot] = torch.empty(images.shape, dtype=torch.float32, memory_format=memory_format)
        return self._ring[slot]

    def _constants(self, device: torch.device, channel_repeats: int, plane: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, channel_repeats, plane)
        if key not in self._rows:
            def row(values):
                return values.repeat(channel_repeats).repeat_interleave(plane).to(device)
            self._rows[key] = (row(self.scale), row(self.shift))
        return self._rows[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self._output(images)
        if images.device.type == "cpu" and self.numba_on_cpu:
            numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
            pixels = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())  # FFCV's NHWC buffer: no copy
            if self.channels_last:
                _normalise_to_pixels(pixels, out.permute(0, 2, 3, 1).numpy(), self.scale.numpy(), self.shift.numpy())
            else:
                _normalise_to_planes(pixels, out.numpy(), self.scale.numpy(), self.shift.numpy())
            return out
        out.copy_(images)
        n, c, h, w = out.shape
        if self.channels_last:
            rows = out.permute(0, 2, 3, 1).view(n * h, w * c)  # NHWC memory, one image row per row
            scale, shift = self._constants(out.device, w, 1)
        else:
            rows = out.view(n, c * h * w)  # one image per row: channel planes one after the other
            scale, shift = self._constants(out.device, 1, h * w)
        torch.addcmul(shift, rows, scale, out=rows)
        return out


def _label_pipeline(device: torch.device) -> list:
    pipeline = [IntDecoder(), ToTensor()]
    if device.type == "cuda":
        pipeline.append(ToDevice(device, non_blocking=True))
    return pipeline


class TrainLoader:
    """Training batches of one worker; `set_epoch(e)` before iterating epoch `e` (resume included)."""

    def __init__(self, loader: Loader, decoder: RandomResizedCropRGBImageDecoder, cfg: DataConfig, finish):
        self.loader = loader
        self._decoder = decoder
        self._cfg = cfg
        self._finish = finish

    def resolution_for(self, epoch: int) -> int:
        return self._cfg.resolution_for(epoch)

    def set_epoch(self, epoch: int) -> None:
        # FFCV seeds each epoch's permutation with seed + epoch: setting it keeps a resumed run in step.
        self.loader.next_epoch = epoch

    @property
    def next_epoch(self) -> int:
        return self.loader.next_epoch

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # FFCV re-allocates its buffers from the decoder's output size at the start of every epoch.
        res = self.resolution_for(self.loader.next_epoch)
        self._decoder.output_size = (res, res)
        for images, labels in epoch_batches(self.loader):
            yield self._finish(images), labels.view(-1).long()


class ValLoader:
    """Validation batches of this rank's shard: every validation image is in exactly one rank's shard."""

    def __init__(self, loader: Loader, num_samples: int, finish):
        self.loader = loader
        self.num_samples = num_samples  # in this rank's shard
        self._finish = finish

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in epoch_batches(self.loader):
            yield self._finish(images), labels.view(-1).long()


def holdout_split(total: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of a training set of `total` images: every k-th image, k =
    round(1 / fraction), is held out. A stride rather than a random draw keeps the slice class-balanced on
    a class-ordered file and is the same on every node; uint64 like FFCV's own indices."""
    everything = np.arange(total, dtype=np.uint64)
    if fraction <= 0:
        return everything, everything[:0]
    held = np.zeros(total, dtype=bool)
    held[:: max(int(round(1 / fraction)), 2)] = True
    return everything[~held], everything[held]


def _per_worker_batch(cfg: DataConfig, world_size: int) -> int:
    per_worker = cfg.batch_size // world_size
    if per_worker < 1:
        raise DataError(
            f"batch_size ({cfg.batch_size}) is smaller than the number of workers ({world_size}); "
            "set data.batch_size to at least the number of workers."
        )
    return per_worker


def build_train_loader(
    cfg: DataConfig, *, rank: int, world_size: int, device: torch.device, distributed: bool
) -> TrainLoader:
    del rank  # FFCV's distributed sampler reads the rank from the process group
    batch = _per_worker_batch(cfg, world_size)
    res = cfg.resolution_for(0)
    decoder = RegionDecodingRandomResizedCrop((res, res), scale=tuple(cfg.train_crop_scale), seed=cfg.seed,
                                              crop_only=cfg.decode_crop_only)
    path = str(Path(cfg.path) / "train.beton")
    kept = holdout_split(Reader(path).num_samples, cfg.holdout_fraction)[0] if cfg.holdout_fraction else None
    loader = Loader(
        path,
        indices=kept,  # without the held-out slice, if any
        batch_size=batch,
        num_workers=cfg.num_workers,
        # in_memory: the data set fits in RAM, so the OS page cache serves it (ffcv-imagenet's choice).
        os_cache=cfg.in_memory,
        # QUASI_RANDOM is not implemented with distributed=True; RANDOM with a seed is the same on every rank.
        order=OrderOption.RANDOM,
        distributed=distributed,
        seed=cfg.seed,
        drop_last=True,
        pipelines={
            IMAGE_FIELD: [decoder, RandomHorizontalFlipInPlace(seed=cfg.seed), *_image_tail(device)],
            LABEL_FIELD: _label_pipeline(device),
        },
    )
    if len(loader) == 0:
        raise DataError(
            f"The training set of {cfg.path} is smaller than one per-worker batch ({batch} images); "
            "lower data.batch_size."
        )
    return TrainLoader(loader, decoder, cfg, NormalizeImages(cfg))


def build_val_loader(cfg: DataConfig, *, rank: int, world_size: int, device: torch.device,
                     holdout: bool = False) -> ValLoader:
    """This rank's shard of the validation set or, with `holdout`, of the held-out slice of the training
    set, read the validation way (centre crop, sequential)."""
    batch = _per_worker_batch(cfg, world_size)
    path = str(Path(cfg.path) / ("train.beton" if holdout else "val.beton"))
    total = Reader(path).num_samples
    # uint64 like FFCV's own indices: int64 ones get mixed with uint64 into float64 and fail in numba.
    images = holdout_split(total, cfg.holdout_fraction)[1] if holdout else np.arange(total, dtype=np.uint64)
    shard = np.array_split(images, world_size)[rank]
    if len(shard) == 0:
        what = "held-out slice of the training set" if holdout else "validation set"
        raise DataError(
            f"The {what} of {cfg.path} has {len(images)} images, fewer than the {world_size} workers; "
            "use fewer workers or a larger data set."
        )
    res = cfg.val_resolution
    centre_crop = RegionDecodingCenterCrop if cfg.decode_crop_only else CenterCropRGBImageDecoder
    loader = Loader(
        path,
        batch_size=batch,
        num_workers=cfg.num_workers,
        os_cache=cfg.in_memory,
        order=OrderOption.SEQUENTIAL,
        distributed=False,  # the shard is explicit: FFCV's distributed sampler would pad it
        indices=shard,
        drop_last=False,
        pipelines={
            IMAGE_FIELD: [centre_crop((res, res), ratio=cfg.val_crop_ratio), *_image_tail(device)],
            LABEL_FIELD: _label_pipeline(device),
        },
    )
    return ValLoader(loader, len(shard), NormalizeImages(cfg))


def build_loaders(
    cfg: DataConfig, *, rank: int, world_size: int, device: torch.device, distributed: bool
) -> tuple[TrainLoader, ValLoader]:
    """The training and validation loaders of worker `rank` of `world_size` (see the module docstring)."""
    check_data_folder(cfg.path)
    if not distributed and world_size != 1:
        raise DataError(
            f"world_size is {world_size} but distributed is False; pass distributed=True inside a process group "
            "(Ray Train) or world_size=1."
        )
    if distributed and not torch.distributed.is_initialized():
        raise DataError(
            "distributed=True needs an initialised torch.distributed process group (Ray Train makes one); "
            "call build_loaders inside the training worker."
        )
    if distributed and (torch.distributed.get_rank(), torch.distributed.get_world_size()) != (rank, world_size):
        # FFCV shards the training set by the process group's rank: a different `rank` would mismatch the
        # validation shard.
        raise DataError(
            f"rank {rank} of world_size {world_size} differs from the process group's rank "
            f"{torch.distributed.get_rank()} of {torch.distributed.get_world_size()}; pass the process group's values."
        )
    train = build_train_loader(cfg, rank=rank, world_size=world_size, device=device, distributed=distributed)
    val = build_val_loader(cfg, rank=rank, world_size=world_size, device=device)
    return train, val

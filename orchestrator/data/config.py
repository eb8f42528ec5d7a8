"""Typed settings of the data package: how to read a data folder, and how to write one.

`DataConfig` is what the training engine passes to `build_loaders`; `WriterConfig` is what
`pipelines/prepare_data.py` uses to turn an image folder into `.beton` files.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ImageNet channel statistics in [0, 1] pixel units (the convention of torchvision and ffcv-imagenet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ProgressiveResolution(BaseModel):
    """Training resolution that grows linearly from `start_res` to `end_res` (FFCV's progressive resizing).

    Before `start_epoch` the loader uses `start_res`, from `end_epoch` on it uses `end_res`; in between
    the value is interpolated and rounded down to a multiple of `step` (small changes would only cost
    a re-allocation of the batch buffers for no visible difference).
    """

    model_config = ConfigDict(extra="forbid")

    start_res: int = Field(gt=0)
    end_res: int = Field(gt=0)
    start_epoch: int = Field(ge=0)
    end_epoch: int = Field(ge=0)
    step: int = Field(default=32, gt=0)

    @model_validator(mode="after")
    def _epochs_in_order(self) -> "ProgressiveResolution":
        if self.end_epoch <= self.start_epoch:
            raise ValueError(
                f"progressive.end_epoch ({self.end_epoch}) must be greater than progressive.start_epoch "
                f"({self.start_epoch}); set end_epoch after start_epoch."
            )
        return self

    def resolution_for(self, epoch: int) -> int:
        if epoch <= self.start_epoch:
            return self.start_res
        if epoch >= self.end_epoch:
            return self.end_res
        fraction = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        res = self.start_res + fraction * (self.end_res - self.start_res)
        return max(self.step, int(res) // self.step * self.step)


class DataConfig(BaseModel):
    """Where the data is and how the training and validation loaders read it.

    `batch_size` is the GLOBAL batch: each of `world_size` workers reads `batch_size // world_size`.
    `val_crop_ratio` is (centre crop side) / (shorter image side) before the resize to `val_resolution`:
    224/256 is the ImageNet protocol, 1.0 keeps the whole image.
    """

    model_config = ConfigDict(extra="forbid")

    path: str
    train_resolution: int = Field(default=224, gt=0)
    val_resolution: int = Field(default=224, gt=0)
    val_crop_ratio: float = Field(default=224 / 256, gt=0, le=1)
    # Area range of the training random-resized crop: ImageNet's (0.08, 1); small images (the 32x32
    # digits) lose their content at 8 % and want a larger lower bound.
    train_crop_scale: tuple[float, float] = (0.08, 1.0)
    # Share of the training set held out from training and evaluated like validation data: what a Stage III
    # sweep picks its best trial on, so that the tables' validation figures never choose a model.
    holdout_fraction: float = Field(default=0.0, ge=0, le=0.5)
    batch_size: int = Field(default=256, gt=0)
    num_workers: int = Field(default=8, gt=0)
    # The training order (FFCV's permutation of epoch e uses seed + e) and every crop and flip.
    seed: int = 0
    progressive: ProgressiveResolution | None = None
    in_memory: bool = True
    # JPEGs: decode only the window of the crop (training's random-resized one, validation's centre one): the
    # same pixels as a whole decode then a crop, for less CPU time; needs a C compiler and libjpeg's headers
    # on the machine that loads the data.
    decode_crop_only: bool = True
    channels_last: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("train_crop_scale")
    @classmethod
    def _crop_scale_is_a_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high <= 1:
            raise ValueError(f"train_crop_scale must be (low, high) with 0 < low <= high <= 1, got {value}")
        return value

    def resolution_for(self, epoch: int) -> int:
        """The training resolution of `epoch` (constant unless a progressive schedule is set)."""
        if self.progressive is None:
            return self.train_resolution
        return self.progressive.resolution_for(epoch)


class WriterConfig(BaseModel):
    """How images are stored in a `.beton` file.

    Defaults are ffcv-imagenet's ImageNet settings (`IMAGENET_WRITER`): longest side at most 500 px,
    half of the images JPEG-compressed at quality 90, the rest stored raw; 8 MiB pages.
    """

    model_config = ConfigDict(extra="forbid")

    max_resolution: int | None = Field(default=500, gt=0)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    compress_probability: float = Field(default=0.5, ge=0, le=1)
    page_size: int = Field(default=8 * 1024 * 1024)
    workers: int = Field(default=8, gt=0)
    # Fraction of unreadable images tolerated (skipped and listed) before the conversion fails.
    max_bad_fraction: float = Field(default=0.001, ge=0, le=1)

    @field_validator("page_size")
    @classmethod
    def _page_size_is_valid(cls, page_size: int) -> int:
        minimum = 2 * 1024 * 1024
        if page_size < minimum or page_size & (page_size - 1):
            raise ValueError(
                f"page_size ({page_size} bytes) must be a power of two of at least {minimum} bytes (2 MiB), "
                "the only page sizes FFCV reads"
            )
        return page_size


IMAGENET_WRITER = WriterConfig()

"""Images/s of the FFCV training loader against a PyTorch DataLoader decoding the same JPEGs with Pillow.

    .venv/bin/python bench/loader.py --images 3000 --workers 2 --batch-size 64 --epochs 4

Makes `--images` 160x160 JPEG files (quality 90, smooth random content, 10 classes) in a temporary folder,
writes them to a `.beton` stored as JPEG (so both loaders decode JPEG), then reads them for `--epochs`
epochs with each loader: random-resized crop to `--resolution` (scale 0.08-1, ratio 3/4-4/3), horizontal
flip, ImageNet normalisation, float32 NCHW batches of `--batch-size`, `--workers` workers (FFCV threads,
DataLoader processes). Steady state = images/s over every epoch but the first; "with start-up" = images/s
over the whole run, construction and compilation included; images per CPU-second (the process, its threads
and its worker processes) in the steady epochs is the figure that other load on the machine does not skew.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from orchestrator.data.beton import write_beton
from orchestrator.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, WriterConfig
from orchestrator.data.image_folder import ImageSamples, Sample
from orchestrator.data.loaders import build_train_loader

CLASSES = 10


def make_jpegs(folder: Path, count: int, size: int = 160) -> list[Sample]:
    rng = np.random.default_rng(0)
    samples = []
    for index in range(count):
        grid = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
        image = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
        path = folder / f"{index:05d}.jpg"
        image.save(path, quality=90)
        samples.append(Sample(path, index % CLASSES))
    return samples


def random_resized_box(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, right, bottom) of a random crop with the area and aspect-ratio ranges FFCV uses."""
    area = width * height
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = random.randint(0, width - w), random.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class PillowJpegs(torch.utils.data.Dataset):
    """The baseline: decode with Pillow, random-resized crop, flip, normalise, CHW float32."""

    def __init__(self, samples: list[Sample], resolution: int):
        self.samples, self.resolution = samples, resolution
        self.mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255
        self.std = np.array(IMAGENET_STD, dtype=np.float32) * 255

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        with Image.open(sample.path) as image:
            image = image.convert("RGB")
            box = random_resized_box(*image.size)
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR, box=box)
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = (np.asarray(image, dtype=np.float32) - self.mean) / self.std
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), sample.label


def _seed_worker(worker_id: int) -> None:
    random.seed(torch.initial_seed() % 2**32)


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its live worker processes (DataLoader workers)."""
    mine = os.times()
    total = mine.user + mine.system
    ticks = os.sysconf("SC_CLK_TCK")
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError, ValueError):
            # Fields 14 and 15 of /proc/PID/stat (after the parenthesised name): utime and stime in ticks.
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def time_epochs(make_loader, epochs: int) -> dict:
    """Wall-clock images/s (steady and with start-up) and, robust to other load on the machine, images per
    CPU-second in the steady epochs."""
    start = time.perf_counter()
    loader = make_loader()
    epoch_times, epoch_cpu, images = [], [], 0
    for epoch in range(epochs):
        epoch_start, cpu_start = time.perf_counter(), cpu_seconds()
        count = 0
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch, _ in loader:
            count += batch.shape[0]
        epoch_times.append(time.perf_counter() - epoch_start)
        epoch_cpu.append(cpu_seconds() - cpu_start)
        images = count
    total = time.perf_counter() - start
    return {
        "images_per_epoch": images,
        "first_epoch_s": round(epoch_times[0], 2),
        "steady_images_per_s": round(images * (epochs - 1) / sum(epoch_times[1:]), 1),
        "with_startup_images_per_s": round(images * epochs / total, 1),
        "steady_images_per_cpu_s": round(images * (epochs - 1) / sum(epoch_cpu[1:]), 1),
        "total_s": round(total, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    assert args.epochs >= 2, "--epochs must be at least 2 (the first one is the warm-up)"

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        (tmp / "jpegs").mkdir()
        samples = make_jpegs(tmp / "jpegs", args.images)
        (tmp / "data").mkdir()
        writer = WriterConfig(max_resolution=None, jpeg_quality=90, page_size=8 * 1024 * 1024, workers=args.workers)
        write_beton(ImageSamples(samples), tmp / "data" / "train.beton", writer, write_mode="jpg", desc="beton")

        cfg = DataConfig(path=str(tmp / "data"), train_resolution=args.resolution, batch_size=args.batch_size,
                         num_workers=args.workers, seed=0)
        pillow = time_epochs(
            lambda: torch.utils.data.DataLoader(
                PillowJpegs(samples, args.resolution), batch_size=args.batch_size, shuffle=True, drop_last=True,
                num_workers=args.workers, persistent_workers=True, worker_init_fn=_seed_worker,
            ),
            args.epochs,
        )
        # After the baseline: forking DataLoader workers once FFCV's threads exist is unsafe.
        ffcv = time_epochs(
            lambda: build_train_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"), distributed=False),
            args.epochs,
        )
    result = {
        "settings": vars(args) | {"image_size": 160, "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "ffcv": ffcv,
        "pytorch_pillow": pillow,
        "speedup_steady": round(ffcv["steady_images_per_s"] / pillow["steady_images_per_s"], 2),
        "speedup_per_cpu_s": round(ffcv["steady_images_per_cpu_s"] / pillow["steady_images_per_cpu_s"], 2),
        "speedup_with_startup": round(ffcv["with_startup_images_per_s"] / pillow["with_startup_images_per_s"], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Images/s of the FFCV training loader against a PyTorch DataLoader decoding the same JPEGs with Pillow.

    .venv/bin/python bench/loader.py --imagenet-like --images 1200 --epochs 4 --former-loader   # ImageNet-like JPEGs, crop 224
    .venv/bin/python bench/loader.py --images 3000 --workers 2 --batch-size 64 --epochs 4   # 160 px tiles, crop 128

`--imagenet-like` makes `--images` JPEG files (quality 90) with ImageNet's size distribution (mean about
410x350, sides 190-500) and natural-ish content (smooth multi-scale colour noise, a few flat shapes, blur and
sensor noise, so that the files weigh what photographs of that size do), lays them out as an ImageFolder
tree and converts it with the project's converter (`convert_image_folder`, the path of
`pipelines/prepare_data.py`; `--compress-probability` as there: 1 stores every image as JPEG, the default
data folder's 0.5 stores half of them raw). Without it, 160x160 smooth tiles are written straight to a
`.beton` stored as JPEG.

Both loaders then read the same training images for `--epochs` epochs: random-resized crop to
`--resolution` (scale 0.08-1, ratio 3/4-4/3), horizontal flip, ImageNet normalisation, float32 NCHW batches
of `--batch-size` (what the training step consumes), `--workers` workers (FFCV threads, DataLoader
processes). The loaders take turns, one epoch each, so that the machine's changes of speed fall on all of
them alike. Steady state = images/s over every epoch but the first; "with start-up" = images/s over the
loader's construction (compilation included) and all its epochs; images per CPU-second of the whole process
tree (this process, its threads, and every descendant process such as DataLoader workers) in the steady
epochs is the figure that other load on the machine does not skew.
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
from PIL import Image, ImageDraw, ImageFilter

from orchestrator.data.beton import IMAGE_FIELD, LABEL_FIELD, write_beton
from orchestrator.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig, WriterConfig
from orchestrator.data.convert import convert_image_folder
from orchestrator.data.image_folder import ImageSamples, Sample, scan_image_folder
from orchestrator.data.loaders import NormalizeImages, TrainLoader, build_train_loader

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


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): longest side about 440 +- 60 px (at most 500, ImageNet's usual cap), the aspect
    ratios of photographs, three in four in landscape: mean about 410x350, like ImageNet's training set."""
    long_side = int(np.clip(rng.normal(440, 60), 200, 500))
    aspect = rng.choice([4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9], p=[0.55, 0.15, 0.12, 0.1, 0.08])
    short_side = int(round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.78 else (short_side, long_side)


def imagenet_like_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour noise over five octaves, a few flat shapes with hard edges, a slight blur, then sensor
    noise: at JPEG quality 90 this weighs about 0.45 bytes per pixel (ImageNet's files: about 0.7)."""
    field = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((3, 70), (6, 45), (12, 30), (24, 20), (48, 14), (96, 10)):
        grid = rng.normal(0, 1, (cells, max(2, cells * width // height), 3)).astype(np.float32)
        layer = np.stack(
            [np.asarray(Image.fromarray(grid[:, :, c], mode="F").resize((width, height), Image.Resampling.BICUBIC))
             for c in range(3)], axis=-1,
        )
        colours = rng.normal(0, 0.3, (3, 3)).astype(np.float32) + np.eye(3, dtype=np.float32)
        field += amplitude * layer @ colours
    field += rng.uniform(60, 190, 3).astype(np.float32)
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 14)):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1, y1 = x0 + int(rng.integers(20, width // 2 + 21)), y0 + int(rng.integers(20, height // 2 + 21))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            corners = rng.integers((-20, -20), (width + 20, height + 20), (int(rng.integers(3, 7)), 2))
            draw.polygon([(int(x), int(y)) for x, y in corners], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    pixels = (np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(7, 14), (height, width, 1))
              + rng.normal(0, 4, (height, width, 3)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_imagenet_like(job: tuple[Path, int]) -> tuple[int, int, int]:
    path, index = job
    rng = np.random.default_rng(index)  # image i is the same on every machine and in every process
    width, height = imagenet_like_size(rng)
    imagenet_like_image(rng, width, height).save(path, quality=90)
    return width, height, path.stat().st_size


def make_imagenet_like_folder(root: Path, count: int, *, val_per_class: int = 2, workers: int = 2) -> dict:
    """An ImageFolder tree `root/{train,val}/class_k/*.jpg` of `count` training JPEGs in CLASSES classes;
    returns the mean width, height and file size of the training images."""
    jobs = []
    for split, total in (("train", count), ("val", val_per_class * CLASSES)):
        for index in range(total):
            folder = root / split / f"class_{index % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{index:05d}.jpg", index if split == "train" else 10**6 + index))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        made = pool.map(_write_imagenet_like, jobs, chunksize=16)[:count]
    width, height, size = np.mean(made, axis=0)
    pixels = sum(w * h for w, h, _ in made)
    return {"mean_width": round(width, 1), "mean_height": round(height, 1), "mean_jpeg_kb": round(size / 1e3, 1),
            "jpeg_bytes_per_pixel": round(sum(s for _, _, s in made) / pixels, 3)}


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


def pillow_loader(samples: list[Sample], args) -> torch.utils.data.DataLoader:
    """The baseline DataLoader, its worker processes already started: they must fork before any FFCV thread
    exists (forking a process with FFCV's threads running is unsafe), and persist, idle, through the other
    loaders' turns."""
    loader = torch.utils.data.DataLoader(
        PillowJpegs(samples, args.resolution), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=args.workers, persistent_workers=True, worker_init_fn=_seed_worker,
    )
    iter(loader)
    return loader


def _seed_worker(worker_id: int) -> None:
    random.seed(torch.initial_seed() % 2**32)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children of all its threads, recursively), from /proc."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, children.read_text().split()):
                found += [child, *_descendants(child)]
    return found


def _process_cpu_seconds(pid: int) -> float:
    # Fields 14 and 15 of /proc/PID/stat (after the parenthesised name): utime and stime, in clock ticks.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time of the whole process tree: this process (all its threads, FFCV's included) and every live
    descendant process (DataLoader workers, anything they started)."""
    mine = os.times()
    total = mine.user + mine.system
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(OSError, ValueError):
            total += _process_cpu_seconds(pid)
    return total


def time_interleaved(makers: dict, epochs: int) -> dict[str, dict]:
    """Build every loader of `makers` (name -> constructor) in order, then run their epochs in turns (epoch 0
    of each, epoch 1 of each, ...), so that the machine's slow and fast phases fall on all of them alike.
    Per loader: wall-clock images/s (steady, and with start-up: its construction plus all its epochs) and,
    robust to other load on the machine, images per CPU-second in the steady epochs (all but the first). The
    CPU time is the whole process tree's in that loader's epochs; the others' idle threads and workers add
    nothing measurable."""
    loaders, built_s = {}, {}
    for name, make in makers.items():
        start = time.perf_counter()
        loaders[name] = make()
        built_s[name] = time.perf_counter() - start
    seconds = {name: [] for name in loaders}
    cpu = {name: [] for name in loaders}
    images = {}
    for epoch in range(epochs):
        for name, loader in loaders.items():
            epoch_start, cpu_start = time.perf_counter(), cpu_seconds()
            count = 0
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch, _ in loader:
                count += batch.shape[0]
            seconds[name].append(time.perf_counter() - epoch_start)
            cpu[name].append(cpu_seconds() - cpu_start)
            images[name] = count
    results = {}
    for name in loaders:
        n, steady, steady_cpu = images[name], sum(seconds[name][1:]), sum(cpu[name][1:])
        results[name] = {
            "images_per_epoch": n,
            "build_s": round(built_s[name], 2),
            "first_epoch_s": round(seconds[name][0], 2),
            "steady_images_per_s": round(n * (epochs - 1) / steady, 1),
            "with_startup_images_per_s": round(n * epochs / (built_s[name] + sum(seconds[name])), 1),
            "steady_images_per_cpu_s": round(n * (epochs - 1) / steady_cpu, 1),
            "steady_cpu_s_per_1000_images": round(1000 * steady_cpu / (n * (epochs - 1)), 3),
        }
    return results


def _ffcv_training_loader(cfg: DataConfig, after_flip: list, labels: list):
    """FFCV's own random-resized crop decoder and copying flip, then `after_flip`: the earlier loaders."""
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip

    res = cfg.resolution_for(0)
    decoder = RandomResizedCropRGBImageDecoder((res, res), scale=tuple(cfg.train_crop_scale))
    loader = Loader(
        str(Path(cfg.path) / "train.beton"), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        os_cache=cfg.in_memory, order=OrderOption.RANDOM, seed=cfg.seed, drop_last=True,
        pipelines={IMAGE_FIELD: [decoder, RandomHorizontalFlip(), *after_flip], LABEL_FIELD: labels},
    )
    return loader, decoder


def former_training_loader(cfg: DataConfig) -> TrainLoader:
    """The training loader before crop-only decoding, the in-place flip and the one-pass CPU normalisation:
    FFCV's decoder (every JPEG decoded whole, then cropped), FFCV's flip (a copy of every image) and
    `NormalizeImages`' two tensor passes."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    loader, decoder = _ffcv_training_loader(cfg, [ToTensor(), ToTorchImage(channels_last=True)],
                                            [IntDecoder(), ToTensor()])
    return TrainLoader(loader, decoder, cfg, NormalizeImages(cfg, numba_on_cpu=False))


def ffcv_normalising_in_its_pipeline(cfg: DataConfig):
    """The FFCV training loader as it was before normalisation moved out of FFCV's pipeline: FFCV's numba
    NormalizeImage on CPU, then a contiguous NCHW copy (`ToTorchImage(channels_last=False)`)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.transforms import NormalizeImage, Squeeze, ToTensor, ToTorchImage

    mean, std = np.array(cfg.mean) * 255, np.array(cfg.std) * 255
    normalising = [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage(channels_last=cfg.channels_last)]
    return _ffcv_training_loader(cfg, normalising, [IntDecoder(), ToTensor(), Squeeze()])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet-like", action="store_true",
                        help="ImageNet-sized JPEGs through the project's converter (default: 160 px tiles)")
    parser.add_argument("--images", type=int, help="training images (default 1200 ImageNet-like, 3000 tiles)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resolution", type=int, help="training crop (default 224 ImageNet-like, 128 tiles)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--compress-probability", type=float, default=1.0,
                        help="ImageNet-like: fraction of images the .beton stores as JPEG, the rest raw "
                             "(default %(default)s: both loaders decode every image; the data folders' default is 0.5)")
    parser.add_argument("--former-loader", action="store_true",
                        help="also time the loader before crop-only decoding, the in-place flip and the "
                             "one-pass CPU normalisation")
    parser.add_argument("--previous-ffcv", action="store_true",
                        help="also time FFCV normalising inside its own pipeline (the loader before normalisation "
                             "left FFCV's pipeline)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first one is the warm-up)")
    args.images = args.images or (1200 if args.imagenet_like else 3000)
    args.resolution = args.resolution or (224 if args.imagenet_like else 128)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        if args.imagenet_like:
            images = make_imagenet_like_folder(tmp / "src", args.images, workers=args.workers)
            writer = WriterConfig(jpeg_quality=90, compress_probability=args.compress_probability,
                                  workers=args.workers)  # the data folders' defaults otherwise (longest side 500)
            convert_image_folder(tmp / "src", tmp / "data", writer)
            samples = scan_image_folder(tmp / "src")[1]["train"]
        else:
            (tmp / "jpegs").mkdir()
            samples = make_jpegs(tmp / "jpegs", args.images)
            images = {"mean_width": 160, "mean_height": 160}
            (tmp / "data").mkdir()
            writer = WriterConfig(max_resolution=None, jpeg_quality=90, page_size=8 * 1024 * 1024,
                                  workers=args.workers)
            write_beton(ImageSamples(samples), tmp / "data" / "train.beton", writer, write_mode="jpg", desc="beton")
        images["beton_mb"] = round((tmp / "data" / "train.beton").stat().st_size / 1e6, 1)

        cfg = DataConfig(path=str(tmp / "data"), train_resolution=args.resolution, batch_size=args.batch_size,
                         num_workers=args.workers, seed=0)
        makers = {
            "pytorch_pillow": lambda: pillow_loader(samples, args),
            "ffcv": lambda: build_train_loader(cfg, rank=0, world_size=1, device=torch.device("cpu"),
                                               distributed=False),
        }
        if args.former_loader:
            makers["former_ffcv"] = lambda: former_training_loader(cfg)
        if args.previous_ffcv:
            makers["ffcv_normalising_in_its_pipeline"] = lambda: ffcv_normalising_in_its_pipeline(cfg)
        timed = time_interleaved(makers, args.epochs)
    ffcv, pillow = timed["ffcv"], timed["pytorch_pillow"]
    former, previous = timed.get("former_ffcv"), timed.get("ffcv_normalising_in_its_pipeline")
    result = {
        "settings": vars(args) | {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "images": images,
        "ffcv": ffcv,
        "pytorch_pillow": pillow,
        "speedup_steady": round(ffcv["steady_images_per_s"] / pillow["steady_images_per_s"], 2),
        "speedup_per_cpu_s": round(ffcv["steady_images_per_cpu_s"] / pillow["steady_images_per_cpu_s"], 2),
        "speedup_with_startup": round(ffcv["with_startup_images_per_s"] / pillow["with_startup_images_per_s"], 2),
    }
    if former:
        result["former_ffcv"] = former
        result["former_speedup_per_cpu_s"] = round(
            former["steady_images_per_cpu_s"] / pillow["steady_images_per_cpu_s"], 2)
    if previous:
        result["ffcv_normalising_in_its_pipeline"] = previous
        result["previous_speedup_per_cpu_s"] = round(
            previous["steady_images_per_cpu_s"] / pillow["steady_images_per_cpu_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

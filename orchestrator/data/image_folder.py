"""Reading an ImageFolder tree (`SRC/train/<class>/<image>`, `SRC/val/<class>/<image>`, the ImageNet layout).

Every check here fails with one `DataError` sentence that says what is wrong and what to do.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import DataError

SPLITS = ("train", "val")


def _image_extensions() -> frozenset[str]:
    # Any format Pillow can open counts as an image; other files (README, .DS_Store) are ignored.
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path, extensions: frozenset[str]) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    )


def scan_image_folder(src: str | Path) -> tuple[dict[str, int], dict[str, list[Sample]]]:
    """Class name -> index (sorted names, same for both splits) and each split's samples in a fixed order."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"The source folder {src} does not exist; pass --src a folder that holds train/ and val/.")
    class_names = {}
    for split in SPLITS:
        split_dir = src / split
        if not split_dir.is_dir():
            raise DataError(
                f"{src} has no {split}/ folder; the source must hold train/ and val/, each with one sub-folder per class."
            )
        class_names[split] = _class_folders(split_dir)
        if not class_names[split]:
            raise DataError(
                f"{split_dir} has no class folders; put each class's images in its own sub-folder, "
                f"e.g. {split}/<class name>/image.jpg."
            )
    if class_names["train"] != class_names["val"]:
        only_train = sorted(set(class_names["train"]) - set(class_names["val"]))
        only_val = sorted(set(class_names["val"]) - set(class_names["train"]))
        raise DataError(
            f"train/ and val/ have different classes (only in train: {', '.join(only_train) or 'none'}; "
            f"only in val: {', '.join(only_val) or 'none'}); give both splits the same class folders."
        )
    classes = {name: index for index, name in enumerate(class_names["train"])}
    extensions = _image_extensions()
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        samples = []
        for name, label in classes.items():
            images = _images_in(src / split / name, extensions)
            if not images:
                raise DataError(
                    f"The class folder {src / split / name} has no images; add images to it or remove the class "
                    "from both train/ and val/."
                )
            samples.extend(Sample(path, label) for path in images)
        splits[split] = samples
    return classes, splits


def load_rgb(path: Path) -> np.ndarray:
    """Decode any Pillow image into the 3-channel uint8 HxWx3 layout every `.beton` stores."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _unreadable_reason(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            # A reduced-scale decode still reads every byte of a JPEG, so truncation is caught, at a fraction
            # of the cost of a full decode.
            image.draft("RGB", (64, 64))
            image.load()
            image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any failure means "skip this image"
        return f"{type(error).__name__}: {error}".replace("\n", " ")
    return None


def find_unreadable(samples: list[Sample], *, workers: int, desc: str) -> list[tuple[Path, str]]:
    """(path, reason) of every image Pillow cannot decode, checked in `workers` processes with a progress bar."""
    paths = [s.path for s in samples]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        reasons = list(
            tqdm(
                pool.imap(_unreadable_reason, paths, chunksize=64),
                total=len(paths),
                desc=desc,
                unit="img",
            )
        )
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


class ImageSamples:
    """Indexable (image, label) pairs for FFCV's writer, decoded in its worker processes.

    An image that fails to decode here (it passed `find_unreadable`, so the disk changed under us) must not
    raise: FFCV's writer waits forever for a worker that died. It is written as a 1x1 black image and
    counted in `failures`; the caller then discards the file.
    """

    def __init__(self, samples: list[Sample]):
        self.samples = samples
        self.failures = multiprocessing.get_context("fork").Value("i", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        sample = self.samples[index]
        try:
            image = load_rgb(sample.path)
        except Exception:  # noqa: BLE001
            with self.failures.get_lock():
                self.failures.value += 1
            image = np.zeros((1, 1, 3), dtype=np.uint8)
        return image, sample.label

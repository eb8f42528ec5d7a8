"""ImageFolder tree (`SRC/train/<class>/*`, `SRC/val/<class>/*`) -> `OUT/{train,val}.beton` + `classes.json`.

Order of work: check the tree (classes, empty classes), check that every image decodes (unreadable ones are
skipped, counted and listed in `OUT/skipped.txt`; more than `max_bad_fraction` of them fails the run),
then write both splits and `classes.json` into a staging folder beside OUT (`OUT.staging-<pid>`) and rename
it into place: OUT holds the old data set or the new one, never a mix (a conversion that fails on val after
a good one leaves the old folder as it was). What a killed conversion left behind (`*.tmp-<pid>` files,
staging folders) is removed when the next one starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from orchestrator import atomic

from .beton import ensure_writable_folder, write_atomically, write_beton, write_json
from .config import WriterConfig
from .errors import DataError
from .image_folder import SPLITS, ImageSamples, Sample, find_unreadable, scan_image_folder


@dataclass(frozen=True)
class ConversionSummary:
    classes: dict[str, int]
    written: dict[str, int]  # images per split
    skipped: list[tuple[Path, str]]


def _drop_unreadable(split: str, samples: list[Sample], bad: set[Path], classes: dict[str, int]) -> list[Sample]:
    kept = [s for s in samples if s.path not in bad]
    emptied = sorted(set(classes) - {name for name, label in classes.items() if any(s.label == label for s in kept)})
    if emptied:
        raise DataError(
            f"Every image of class {emptied[0]} in {split}/ is unreadable (see skipped.txt); replace them or remove "
            "the class from both train/ and val/."
        )
    return kept


def convert_image_folder(src: str | Path, out: str | Path, writer: WriterConfig) -> ConversionSummary:
    out = ensure_writable_folder(out)
    atomic.remove_stale(out)
    atomic.remove_stale(out.parent, prefix=out.name)
    classes, splits = scan_image_folder(src)

    skipped: list[tuple[Path, str]] = []
    for split in SPLITS:
        skipped += find_unreadable(splits[split], workers=writer.workers, desc=f"checking {split}")
    write_atomically(out / "skipped.txt", "".join(f"{path}\t{reason}\n" for path, reason in skipped))
    total = sum(len(samples) for samples in splits.values())
    if len(skipped) > writer.max_bad_fraction * total:
        raise DataError(
            f"{len(skipped)} of {total} images are unreadable, more than the allowed fraction "
            f"{writer.max_bad_fraction} (listed in {out / 'skipped.txt'}); fix or remove them, or raise "
            "--max-bad-fraction."
        )

    bad = {path for path, _ in skipped}
    kept = {split: _drop_unreadable(split, splits[split], bad, classes) for split in SPLITS}  # both, first
    written = {}
    with atomic.staged_folder(out, drop=(".complete",)) as staging:
        for split in SPLITS:
            write_beton(ImageSamples(kept[split]), staging / f"{split}.beton", writer, desc=f"writing {split}")
            written[split] = len(kept[split])
        write_json(staging / "classes.json", classes)
    return ConversionSummary(classes=classes, written=written, skipped=skipped)

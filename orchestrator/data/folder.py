"""A data folder (`train.beton`, `val.beton`, `classes.json`) checked and fingerprinted without FFCV.

`check_data_folder` runs before Ray starts: the folder exists, holds the three files, `classes.json` has
as many classes as the model has outputs, and each `.beton` starts with FFCV's header (read with numpy,
in FFCV's own layout), so a foreign or truncated file is named in one sentence instead of an
`AssertionError` inside a worker. `manifest_digest` is what the config hash covers of the data: a stage
trains again when the data changed, though its path did not.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .errors import DataError

DATA_FILES = ("train.beton", "val.beton", "classes.json")
SPLIT_FILES = ("train.beton", "val.beton")

# FFCV 1.0's file layout (ffcv/types.py): a header, then one descriptor per field.
FFCV_VERSION = 2
BETON_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                         ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESCRIPTOR = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                            align=True)
EXPECTED_FIELDS = {"image": 2, "label": 1}  # name -> FFCV type id (RGBImageField, IntField)


def _make_hint(folder: Path) -> str:
    return (f"create it with `python pipelines/prepare_data.py --src DIR --out {folder}` "
            f"(or `--embedded digits`)")


def read_beton_header(path: str | Path) -> dict:
    """The header and field names of a `.beton`, or DataError naming the file when it is not FFCV's."""
    path = Path(path)
    size = path.stat().st_size
    fixed = BETON_HEADER.itemsize + len(EXPECTED_FIELDS) * FIELD_DESCRIPTOR.itemsize
    problem = None
    if size < fixed:
        problem = f"it is {size} bytes, shorter than an FFCV header"
    else:
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(BETON_HEADER.itemsize), dtype=BETON_HEADER)[0]
            count = int(header["num_fields"])
            raw = f.read(FIELD_DESCRIPTOR.itemsize * min(count, 16))
            fields = np.frombuffer(raw[:len(raw) - len(raw) % FIELD_DESCRIPTOR.itemsize], dtype=FIELD_DESCRIPTOR)
        names = {bytes(d["name"]).rstrip(b"\0").decode("ascii", "replace"): int(d["type_id"]) for d in fields}
        if int(header["version"]) != FFCV_VERSION:
            problem = f"its header says format version {int(header['version'])}, not FFCV's {FFCV_VERSION}"
        elif names != EXPECTED_FIELDS:
            problem = f"its fields are {sorted(names)}, not an image and a label"
        elif not int(header["num_samples"]):
            problem = "it holds no samples"
        elif not fixed <= int(header["alloc_table_ptr"]) < size:
            problem = "it is truncated (its allocation table lies past its end)"
    if problem:
        raise DataError(f"{path} is not a data file this pipeline wrote ({problem}); write the data folder again "
                        f"with `python pipelines/prepare_data.py`.")
    return {"num_samples": int(header["num_samples"]), "page_size": int(header["page_size"]), "bytes": size}


def check_data_folder(path: str | Path, num_classes: int | None = None) -> dict[str, int]:
    """Fail with one sentence unless `path` is a whole data folder (of `num_classes` classes when given);
    returns class name -> label."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"The data folder {folder} does not exist; {_make_hint(folder)}.")
    missing = [name for name in DATA_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"The data folder {folder} has no {', '.join(missing)}; {_make_hint(folder)}.")
    try:
        classes = json.loads((folder / "classes.json").read_text())
        if not isinstance(classes, dict):
            raise ValueError
    except ValueError:
        raise DataError(f"{folder / 'classes.json'} is not a JSON mapping of class name to label; "
                        f"{_make_hint(folder)}.") from None
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(f"The data folder {folder} has {len(classes)} classes (classes.json) but the config says "
                        f"num_classes: {num_classes}; set data.num_classes to {len(classes)} or point data.path "
                        f"at the data it was meant for.")
    for name in SPLIT_FILES:
        read_beton_header(folder / name)
    return {str(k): int(v) for k, v in classes.items()}


def manifest_digest(path: str | Path) -> str:
    """sha256 over classes.json and each .beton's size and first bytes (header and field descriptors);
    "absent" when the folder is not there (a config checked before its data exists)."""
    folder = Path(path)
    if not folder.is_dir():
        return "absent"
    digest = hashlib.sha256()
    head = BETON_HEADER.itemsize + len(EXPECTED_FIELDS) * FIELD_DESCRIPTOR.itemsize
    for name in DATA_FILES:
        file = folder / name
        digest.update(name.encode())
        if not file.is_file():
            digest.update(b"missing")
            continue
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as f:
            digest.update(f.read() if name == "classes.json" else f.read(head))
    return digest.hexdigest()

"""Whole checkpoints: what a stage resumes from.

Every rank lists the files it put into an epoch's checkpoint folder (relative path, size, and a sha256 for
files up to HASHED_BYTES) in `manifest_rank<r>.json`, the last file it writes there before Ray uploads the
folder. A checkpoint is whole when the manifest of every rank is there and every file it lists matches.

On resume each rank checks Ray's newest recorded checkpoint (a remote one in a local copy), and the ranks agree
(a checkpoint whole on one rank but not on another is not whole); a checkpoint that is not whole is skipped
with one line saying why, and the one recorded before it is tried; when none is whole the stage starts
again from epoch 0, and says so.

Why a private copy: Ray's `Checkpoint.as_directory` shares one temporary folder between the processes of a
node, and a process that asks for it after another has finished downloading downloads again into the same
folder, rewriting the files the other rank is reading (torch: "file read failed"). Each rank therefore
reads a remote checkpoint from a folder of its own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from orchestrator import atomic

MANIFEST_PREFIX = "manifest_rank"
HASHED_BYTES = 64 * 2**20  # files up to this size also carry a sha256 (model.pt, small shards, `latest`)


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _entry(path: Path) -> dict:
    size = path.stat().st_size
    return {"size": size, **({"sha256": _sha256(path)} if size <= HASHED_BYTES else {})}


def write_manifest(folder: str | Path, *, rank: int, world_size: int) -> Path:
    """List every file this rank wrote into `folder` (manifests excepted) in `manifest_rank<rank>.json`."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): _entry(path) for path in sorted(folder.rglob("*"))
             if path.is_file() and not path.name.startswith(MANIFEST_PREFIX)}
    return atomic.write_text(folder / manifest_name(rank),
                             json.dumps({"rank": rank, "world_size": world_size, "files": files}, indent=1))


def why_not_whole(folder: str | Path) -> str | None:
    """None when the checkpoint in `folder` is whole; otherwise the reason, as a phrase."""
    folder = Path(folder)
    manifests = sorted(folder.glob(f"{MANIFEST_PREFIX}*.json"))
    if not manifests:
        return "it holds no manifest (it was cut off before its last file, or written by an older version)"
    listed: dict[str, dict] = {}
    world_size = None
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
            world_size, files = int(manifest["world_size"]), dict(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"its manifest {path.name} is unreadable ({type(err).__name__})"
        listed.update(files)
    missing = [manifest_name(r) for r in range(world_size) if not (folder / manifest_name(r)).is_file()]
    if missing:
        return f"the manifest of {len(missing)} of its {world_size} ranks is missing ({', '.join(missing)})"
    for name, expected in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} holds {size} bytes where its manifest says {expected['size']}"
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            return f"{name} does not match the sha256 in its manifest"
    return None


@contextlib.contextmanager
def local_folder(checkpoint) -> Iterator[Path]:
    """A Ray checkpoint's files in a local folder: the folder itself on a local filesystem, otherwise a copy
    private to this process, removed afterwards (see the module docstring for why not `as_directory`)."""
    import pyarrow.fs
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with atomic.scratch_folder("resume") as copy:
        checkpoint.to_directory(str(copy))
        yield copy


def _one_reason(reasons: list[str | None]) -> str | None:
    """The ranks' reasons as one: None when every rank found its copy whole."""
    broken = [(rank, reason) for rank, reason in enumerate(reasons) if reason is not None]
    if not broken:
        return None
    rank, reason = broken[0]
    return reason if len(broken) == len(reasons) else f"{reason} (in the copy of rank {rank})"


@contextlib.contextmanager
def newest_whole_checkpoint(candidates: Iterable, *,
                            gather: Callable[[str | None], list[str | None]] = lambda reason: [reason],
                            log: Callable[[str], None] = print, stage: str = "stage") -> Iterator[Path | None]:
    """The local folder of the first checkpoint in `candidates` (newest first) that is whole on every rank,
    or None when none is. `gather(reason)` collects every rank's reason (None: whole) in rank order (an
    all-gather; the ranks walk the same candidates in step, and agree). Each skipped checkpoint gets one
    line from `log`, and a start from epoch 0 after skipping one gets a line too."""
    skipped = 0
    for checkpoint in candidates:
        with local_folder(checkpoint) as folder:
            try:
                reason = why_not_whole(folder)
            except OSError as err:  # a copy that could not even be listed
                reason = f"it could not be read ({err})"
            reason = _one_reason(gather(reason))
            if reason is None:
                yield folder
                return
        skipped += 1
        log(f"[{stage}] checkpoint {checkpoint.path} skipped: {reason}.")
    if skipped:
        log(f"[{stage}] no recorded checkpoint is whole ({skipped} skipped), so the stage starts again from "
            f"epoch 0.")
    yield None

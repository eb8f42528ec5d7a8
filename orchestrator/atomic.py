"""The one way the orchestrator writes a file or a folder: whole or not at all (on `bitmixer_core.durable`).

A file is written under a temporary name in its own folder (`<name>.tmp-<pid>`), flushed and fsynced,
renamed over the final name, and the folder is fsynced so the rename itself survives a power cut. A
reader therefore sees the old file or the new one, never half of one; a writer killed with SIGKILL leaves
only a `*.tmp-<pid>` file, which `remove_stale` deletes at the next start.

A folder whose files belong together (a data folder: train.beton, val.beton, classes.json) is written into
a staging folder beside it (`<name>.staging-<pid>`) and renamed into place once every file is there.

A process's scratch folder (`scratch_folder`: an epoch's checkpoint before Ray takes it, a private copy of
a remote checkpoint) ends in `.scratch-<pid>`, so the folders of a worker that was killed before it could
remove them are found and removed by `remove_stale` at a later worker's start.

    with atomic_file("model.pt") as f:      # a binary file object on the temporary name
        torch.save(payload, f)
    with atomic_path("train.beton") as tmp: # a temporary path, for writers that want a name
        DatasetWriter(str(tmp), ...)
    write_text("table.md", text)
    with staged_folder("data/imagenet") as staging:
        ...  # write every file into `staging`
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

from bitmixer_core.durable import TMP_MARK, commit, fsync_file, fsync_folder, temporary_name

STAGING_MARK = ".staging-"
OLD_MARK = ".old-"
SCRATCH_MARK = ".scratch-"

__all__ = ["TMP_MARK", "STAGING_MARK", "OLD_MARK", "temporary_name", "fsync_folder", "commit", "atomic_path",
           "atomic_file", "write_bytes", "write_text", "copy_file", "remove_stale", "staged_folder", "scratch_folder",
           "SCRATCH_MARK"]


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it becomes `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(final)
    try:
        yield temporary
        commit(temporary, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file object open on a temporary name beside `final`; closed and committed on success."""
    with atomic_path(final) as temporary:
        with open(temporary, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(final, "wb") as f:
        f.write(data)
    return Path(final)


def write_text(final: str | os.PathLike, text: str) -> Path:
    with atomic_file(final, "w") as f:
        f.write(text)
    return Path(final)


def copy_file(source: IO, final: str | os.PathLike) -> Path:
    """Copy a readable binary stream to `final`, atomically."""
    with atomic_file(final, "wb") as f:
        shutil.copyfileobj(source, f)
    return Path(final)


def _pid_of(name: str, mark: str) -> int | None:
    tail = name.rpartition(mark)[2]
    return int(tail) if mark in name and tail.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Delete what a killed writer left in `folder`: `*.tmp-<pid>` files and `*.staging-<pid>` /
    `*.old-<pid>` / `*.scratch-<pid>` folders whose process is gone. An `.old-` folder whose final folder is
    missing (killed between the two renames of `staged_folder`) is put back instead. Only names starting with
    `prefix` are looked at. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        if not entry.name.startswith(prefix):
            continue
        for mark in (TMP_MARK, STAGING_MARK, OLD_MARK, SCRATCH_MARK):
            pid = _pid_of(entry.name, mark)
            if pid is None or _alive(pid):
                continue
            if mark == OLD_MARK:
                final = entry.with_name(entry.name.rpartition(mark)[0])
                if not final.exists():
                    os.replace(entry, final)
                    continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _link_copy(source: Path, target: Path) -> None:
    """Hard links where the filesystem allows (no data copied), else a copy."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, copy_function=link, symlinks=True)
    else:
        link(source, target)


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike, *, drop: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty staging folder beside `final`; on success it replaces `final` whole.

    Entries of the old `final` that the new one does not have are carried over (a user's own files in
    the folder survive), except those named in `drop` and temporary files. On error the staging folder
    is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f"{final.name}{STAGING_MARK}{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
        for entry in staging.rglob("*"):
            if entry.is_file():
                fsync_file(entry)
        if final.is_dir():
            for entry in list(final.iterdir()):
                stale = TMP_MARK in entry.name or STAGING_MARK in entry.name
                if entry.name not in drop and not stale and not (staging / entry.name).exists():
                    _link_copy(entry, staging / entry.name)  # the old folder keeps its own until it goes
        fsync_folder(staging)
        old = final.with_name(f"{final.name}{OLD_MARK}{os.getpid()}")
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
        fsync_folder(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_folder(label: str, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A new private folder under `root` (the system's temporary folder), removed when the block ends; its
    name carries this process's pid, so `remove_stale(root, prefix="bitmixer-")` removes it once the
    process is gone without having removed it (SIGKILL, a lost node)."""
    folder = Path(tempfile.mkdtemp(prefix=f"bitmixer-{label}-", suffix=f"{SCRATCH_MARK}{os.getpid()}", dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)

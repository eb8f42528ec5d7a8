"""Writing a file whole or not at all: a temporary name in the same folder, fsync, rename, fsync the folder.

The core's one file writer (the deployable artifact); the orchestrator's `orchestrator.atomic` builds its
context managers, staged folders and stale-file clean-up on these same functions, so every file the project
writes follows one rule. A writer killed mid-write leaves only `<name>.tmp-<pid>`, never a half file
under the final name.
"""
from __future__ import annotations

import os
from pathlib import Path

TMP_MARK = ".tmp-"


def temporary_name(final: str | os.PathLike) -> Path:
    """Same folder as `final` (so the rename is atomic), unique per process, never ending like `final`."""
    final = Path(final)
    return final.with_name(f"{final.name}{TMP_MARK}{os.getpid()}")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def commit(temporary: str | os.PathLike, final: str | os.PathLike) -> Path:
    """fsync `temporary`, rename it over `final`, fsync the folder (so the rename survives a power cut)."""
    temporary, final = Path(temporary), Path(final)
    fsync_file(temporary)
    os.replace(temporary, final)
    fsync_folder(final.parent)
    return final


def write_bytes(final: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `final` whole; on any error the temporary file is removed and `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(final)
    try:
        temporary.write_bytes(data)
        return commit(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

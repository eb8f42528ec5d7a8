"""orchestrator.atomic: a file or a folder is written whole or not at all, and what a killed writer left is
cleaned up by the next one."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from orchestrator import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "table.md"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("the writer failed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]
    atomic.write_text(target, "new")
    assert target.read_text() == "new"


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_remove_stale_removes_only_what_dead_writers_left(tmp_path):
    """`*.tmp-<pid>` and `*.staging-<pid>` of a process that is gone are removed; those of a live process
    (this one) are kept; an `.old-<pid>` folder whose final folder is missing (killed between the two
    renames) is put back in place."""
    dead = _dead_pid()
    (tmp_path / f"train.beton.tmp-{dead}").write_bytes(b"partial")
    (tmp_path / f"data.staging-{dead}").mkdir()
    (tmp_path / f"model.pt.tmp-{os.getpid()}").write_bytes(b"being written")
    old = tmp_path / f"imagenet.old-{dead}"
    old.mkdir()
    (old / "classes.json").write_text("{}")
    removed = atomic.remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f"train.beton.tmp-{dead}", f"data.staging-{dead}"])
    assert (tmp_path / f"model.pt.tmp-{os.getpid()}").exists()
    assert (tmp_path / "imagenet" / "classes.json").read_text() == "{}"


def test_staged_folder_replaces_whole_and_keeps_the_users_files(tmp_path):
    """The new folder replaces the old one in one rename; a file of the user's in the old folder is carried
    over; names in `drop` are not; on error the old folder is untouched and no staging folder is left."""
    final = tmp_path / "data"
    final.mkdir()
    (final / "train.beton").write_text("old train")
    (final / "NOTES.txt").write_text("mine")
    (final / ".complete").write_text("old marker")
    with pytest.raises(ValueError):
        with atomic.staged_folder(final) as staging:
            (staging / "train.beton").write_text("new train")
            raise ValueError("val failed")
    assert (final / "train.beton").read_text() == "old train" and not list(tmp_path.glob("data.staging-*"))
    with atomic.staged_folder(final, drop=(".complete",)) as staging:
        (staging / "train.beton").write_text("new train")
    assert sorted(p.name for p in final.iterdir()) == ["NOTES.txt", "train.beton"]
    assert (final / "train.beton").read_text() == "new train" and (final / "NOTES.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

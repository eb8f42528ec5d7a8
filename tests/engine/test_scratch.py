"""Scratch folders of stage workers (an epoch's checkpoint before Ray takes it, a private copy of a remote
checkpoint): removed when their block ends, and when their process was killed first, by the next start."""
from __future__ import annotations

import os
import subprocess
import sys

from orchestrator import atomic

# A worker killed (SIGKILL) while its scratch folder exists: the folder outlives it.
KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from orchestrator import atomic
with atomic.scratch_folder("stage-e3", root=sys.argv[1]) as folder:
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1024)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_scratch_folder_is_removed_when_its_block_ends(tmp_path):
    with atomic.scratch_folder("stage-e0", root=tmp_path) as folder:
        (folder / "shard.pt").write_bytes(b"data")
        assert folder.name.startswith("bitmixer-stage-e0-")
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_killed_workers_scratch_folder_is_removed_at_the_next_start_and_a_live_ones_kept(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(tmp_path)], cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    assert killed.returncode == -9
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and atomic.SCRATCH_MARK in left[0].name and (left[0] / "mp_rank_00_model_states.pt").exists()
    other = tmp_path / "unrelated-folder.scratch-1"  # not ours: another program's name
    other.mkdir()
    with atomic.scratch_folder("stage-e1", root=tmp_path) as live:
        removed = atomic.remove_stale(tmp_path, prefix="bitmixer-")
        assert removed == left  # the dead worker's folder, and only it
        assert live.exists() and other.exists()

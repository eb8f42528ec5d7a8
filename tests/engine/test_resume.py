"""Resume takes the newest whole checkpoint: one whose every rank's manifest is there and whose files match
them; a cut-off one is skipped with a line saying why, and with none whole the stage starts from epoch 0.

Real files: each rank writes its shards into a folder of its own with `write_manifest`, and the folders are
merged into one checkpoint folder, as Ray merges the ranks' uploads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs
import pytest
import torch
from ray.train import Checkpoint

from orchestrator.engine.resume import (local_folder, manifest_name, newest_whole_checkpoint, why_not_whole,
                                        write_manifest)

SHARD = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def write_checkpoint(root: Path, epoch: int) -> Path:
    """A two-rank checkpoint of `epoch`, as Ray leaves it in storage."""
    final = root / f"checkpoint_epoch{epoch}"
    for rank in (0, 1):
        own = root / f"rank{rank}-e{epoch}"
        (own / "deepspeed").mkdir(parents=True)
        if rank == 0:
            torch.save({"module": torch.randn(300), "epoch": epoch}, own / "deepspeed/mp_rank_00_model_states.pt")
            torch.save({"state_dict": {"w": torch.randn(50)}, "epoch": epoch}, own / "model.pt")
            (own / "latest").write_text("deepspeed")
        else:
            torch.save({"optimizer": torch.randn(2000)}, own / SHARD)
        write_manifest(own, rank=rank, world_size=2)
        shutil.copytree(own, final, dirs_exist_ok=True)
        shutil.rmtree(own)
    return final


def newest_whole(folders, gather=lambda reason: [reason]):
    lines: list[str] = []
    candidates = [Checkpoint.from_directory(str(f)) for f in folders]
    with newest_whole_checkpoint(candidates, gather=gather, log=lines.append, stage="s") as folder:
        return folder, lines


@pytest.fixture
def two(tmp_path):
    """Epoch 1's checkpoint (newest first) and epoch 0's, both whole."""
    return write_checkpoint(tmp_path, 1), write_checkpoint(tmp_path, 0)


def test_whole_checkpoints_are_whole_and_the_newest_is_taken(two):
    assert why_not_whole(two[0]) is None and why_not_whole(two[1]) is None
    manifest = json.loads((two[0] / manifest_name(1)).read_text())
    assert set(manifest["files"]) == {SHARD}  # each rank lists its own files only
    assert newest_whole(two) == (two[0], [])


def test_a_truncated_shard_makes_resume_take_the_checkpoint_before_it(two):
    """A shard cut off half-way (an upload stopped part-way) must not be resumed from."""
    shard = two[0] / SHARD
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    folder, lines = newest_whole(two)
    assert folder == two[1]
    assert lines == [f"[s] checkpoint {two[0]} skipped: {SHARD} holds {size // 2} bytes where its manifest says "
                     f"{size}."]


def test_a_changed_file_of_the_same_size_is_caught_by_its_sha256(two):
    model_pt = two[0] / "model.pt"
    data = bytearray(model_pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_pt.write_bytes(bytes(data))
    folder, lines = newest_whole(two)
    assert folder == two[1] and lines[0].endswith("model.pt does not match the sha256 in its manifest.")


def test_a_missing_manifest_or_file_makes_resume_take_the_checkpoint_before_it(two, tmp_path):
    (two[0] / manifest_name(1)).unlink()  # rank 1's upload never finished
    folder, lines = newest_whole(two)
    assert folder == two[1]
    assert "the manifest of 1 of its 2 ranks is missing (manifest_rank1.json)" in lines[0]

    (two[1] / "latest").unlink()
    third = write_checkpoint(tmp_path / "more", 2)
    for name in (manifest_name(0), manifest_name(1)):
        (third / name).unlink()  # written by a version without manifests, or cut off before them
    folder, lines = newest_whole([third, *two])
    assert folder is None
    assert lines == [f"[s] checkpoint {third} skipped: it holds no manifest (it was cut off before its last file, "
                     f"or written by an older version).",
                     f"[s] checkpoint {two[0]} skipped: the manifest of 1 of its 2 ranks is missing "
                     f"(manifest_rank1.json).",
                     f"[s] checkpoint {two[1]} skipped: latest is missing.",
                     "[s] no recorded checkpoint is whole (3 skipped), so the stage starts again from epoch 0."]


def test_a_checkpoint_another_rank_found_broken_is_skipped_on_every_rank(two):
    """The ranks agree: whole here but not on another rank means not whole (they must load the same one)."""
    other_rank = iter(["its manifest manifest_rank0.json is unreadable (JSONDecodeError)", None])
    folder, lines = newest_whole(two, gather=lambda reason: [reason, next(other_rank)])
    assert folder == two[1]
    assert lines == [f"[s] checkpoint {two[0]} skipped: its manifest manifest_rank0.json is unreadable "
                     f"(JSONDecodeError) (in the copy of rank 1)."]


def test_no_recorded_checkpoint_means_epoch_0_without_a_line():
    assert newest_whole([]) == (None, [])


def test_a_remote_checkpoint_is_read_from_a_copy_of_this_process_alone(two, tmp_path):
    """Ray's `as_directory` gives every process of a node one shared folder, and a late process downloads
    again into it while another reads (torch: 'file read failed'): each reader gets its own copy instead."""
    remote = pyarrow.fs.SubTreeFileSystem(str(two[0].parent), pyarrow.fs.LocalFileSystem())  # not local
    checkpoint = Checkpoint(two[0].name, filesystem=remote)
    with local_folder(checkpoint) as first, local_folder(checkpoint) as second:
        assert first != second and first != two[0]
        assert why_not_whole(first) is None and why_not_whole(second) is None
        (first / SHARD).write_bytes(b"")  # one reader's copy changing leaves the other's whole
        assert why_not_whole(second) is None
    assert not first.exists() and not second.exists()
    assert why_not_whole(two[0]) is None

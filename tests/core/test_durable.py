"""bitmixer_core.durable: a file is replaced whole or left as it was (the export and every orchestrator
writer rely on it)."""
from __future__ import annotations

import pytest

from bitmixer_core import durable
from orchestrator import atomic


class _Interrupted(Exception):
    pass


def test_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "model.bmx"
    durable.write_bytes(target, b"old")
    durable.write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bmx"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.bmx"
    durable.write_bytes(target, b"old")

    def interrupted_rename(*_args):
        raise _Interrupted()
    monkeypatch.setattr(durable.os, "replace", interrupted_rename)
    with pytest.raises(_Interrupted):
        durable.write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bmx"]


def test_a_killed_writers_temporary_is_what_the_orchestrator_cleans_up(tmp_path):
    """The core and the orchestrator name temporaries alike, so `remove_stale` finds the core's too."""
    left = durable.temporary_name(tmp_path / "model.bmx").with_name(f"model.bmx{durable.TMP_MARK}999999999")
    left.write_bytes(b"half")
    assert atomic.remove_stale(tmp_path) == [left]

"""A conversion stopped half-way never leaves a `.beton` under its final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import left_in_session

from .helpers import make_image_folder


def test_interrupted_conversion_leaves_no_beton(tmp_path):
    """Stopped (SIGTERM) while train.beton is being written: the data goes to a temporary name, so nothing is
    ever named train.beton before it is complete; the stop removes the temporary file and ends the writer
    processes."""
    made = make_image_folder(tmp_path / "src", per_class={"train": 3, "val": 2})
    shutil.copy(made["train"][-1][0], tmp_path / "src" / "train" / "cat" / "stall.png")
    out, marker = tmp_path / "out", tmp_path / "stalled"
    script = Path(__file__).with_name("stalled_convert.py")
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "src"), str(out), str(marker)],
                            cwd=script.parent, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the conversion never reached the stalled image"
            time.sleep(0.2)
        # The split is written inside the staging folder beside `out`, under a temporary name.
        assert list(tmp_path.glob("out.staging-*/train.beton.tmp-*")) and not (out / "train.beton").exists()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # The writer process (stalled for 600 s) must be gone with its parent: list what is left in the session.
        alive = left_in_session(proc.pid)
    finally:
        # Everything this test started is in the session it created: end it, whatever happened above.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM
    assert alive == []
    assert not list(out.glob("*.beton")) and not (out / "classes.json").exists()
    assert not list(out.glob("*.tmp-*")) and not list(tmp_path.glob("out.staging-*"))


def _start_stalled(tmp_path, src, out, marker):
    script = Path(__file__).with_name("stalled_convert.py")
    proc = subprocess.Popen([sys.executable, str(script), str(src), str(out), str(marker)],
                            cwd=script.parent, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the conversion never reached the stalled image"
        time.sleep(0.2)
    return proc


def test_sigkilled_conversion_is_cleaned_up_by_the_next_one(tmp_path):
    """A converter killed with SIGKILL (no handler runs) leaves its staging folder and temporary .beton;
    the next conversion into the same folder removes them and writes the whole data set."""
    from orchestrator.data.convert import convert_image_folder
    from orchestrator.data.config import WriterConfig

    made = make_image_folder(tmp_path / "src", per_class={"train": 3, "val": 2})
    shutil.copy(made["train"][-1][0], tmp_path / "src" / "train" / "cat" / "stall.png")
    out, marker = tmp_path / "out", tmp_path / "stalled"
    proc = _start_stalled(tmp_path, tmp_path / "src", out, marker)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    left = list(tmp_path.glob("out.staging-*"))
    assert left and list(left[0].glob("train.beton.tmp-*"))  # what SIGKILL leaves behind
    assert not (out / "train.beton").exists()

    (tmp_path / "src" / "train" / "cat" / "stall.png").unlink()
    summary = convert_image_folder(tmp_path / "src", out, WriterConfig(max_resolution=None, workers=1,
                                                                       page_size=2 * 1024 * 1024))
    assert summary.written == {"train": 9, "val": 6}
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "skipped.txt", "train.beton", "val.beton"]
    assert not list(tmp_path.glob("out.staging-*")) and not list(tmp_path.rglob("*.tmp-*"))


def test_conversion_failing_on_val_keeps_the_old_folder_whole(tmp_path, monkeypatch):
    """A good conversion, then a second one from another source whose val split fails while it is written:
    the folder keeps the first data set byte for byte (no new train.beton beside the old val.beton and
    classes.json), and no staging folder or temporary file is left."""
    from orchestrator.data import image_folder
    from orchestrator.data.config import WriterConfig
    from orchestrator.data.convert import convert_image_folder
    from orchestrator.data.errors import DataError

    writer = WriterConfig(max_resolution=None, workers=1, page_size=2 * 1024 * 1024)
    make_image_folder(tmp_path / "old", per_class={"train": 3, "val": 2}, seed=0)
    out = tmp_path / "out"
    convert_image_folder(tmp_path / "old", out, writer)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    made = make_image_folder(tmp_path / "new", classes=("dog", "eel"), per_class={"train": 4, "val": 2}, seed=1)
    broken = made["val"][-1][0]  # passes the check, then cannot be read while val.beton is written
    real = image_folder.load_rgb

    def load_rgb(path):
        if path == broken:
            raise OSError("disk changed under the writer")
        return real(path)
    monkeypatch.setattr(image_folder, "load_rgb", load_rgb)  # the forked writer processes inherit it
    with pytest.raises(DataError, match="could not be read while writing"):
        convert_image_folder(tmp_path / "new", out, writer)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before)
    assert not list(tmp_path.glob("out.staging-*")) and not list(tmp_path.rglob("*.tmp-*"))

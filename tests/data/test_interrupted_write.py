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
        assert list(out.glob("train.beton.tmp-*")) and not (out / "train.beton").exists()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        # The writer process (stalled for 600 s) must be gone with its parent: list what is left in the session.
        processes = subprocess.run(["ps", "-o", "stat=,args=", "-s", str(proc.pid)], capture_output=True, text=True)
        # Zombies are dead; Python's resource tracker outlives its parent on purpose, to free shared memory.
        alive = [line for line in processes.stdout.splitlines()
                 if not line.startswith("Z") and "resource_tracker" not in line]
    finally:
        # Everything this test started is in the session it created: end it, whatever happened above.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM
    assert alive == []
    assert not list(out.glob("*.beton")) and not (out / "classes.json").exists()
    assert not list(out.glob("*.tmp-*"))

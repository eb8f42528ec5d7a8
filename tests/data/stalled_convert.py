"""`pipelines/prepare_data.py` whose writer stalls on one image, for `test_interrupted_write.py`.

Run as `python stalled_convert.py SRC OUT STALL_MARKER`: when a writer process reaches `stall.png` it creates
STALL_MARKER and waits, so the test can interrupt the conversion in the middle of writing train.beton.
"""

import signal
import sys
import time
from pathlib import Path

from orchestrator.data import image_folder

from helpers import load_prepare_data

src, out, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
real_load_rgb = image_folder.load_rgb


def stalling_load_rgb(path):
    if path.name == "stall.png":
        marker.touch()
        time.sleep(600)
    return real_load_rgb(path)


image_folder.load_rgb = stalling_load_rgb  # the writer's forked processes inherit the patch
prepare_data = load_prepare_data()
signal.signal(signal.SIGTERM, prepare_data._stop_on_sigterm)  # as in the script's __main__
sys.exit(prepare_data.main(["--src", src, "--out", out, "--workers", "1"]))

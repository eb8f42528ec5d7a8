"""Runs a script that builds DeepSpeed engines in a fresh process (DeepSpeed's process group lives as long as
its process) and returns the JSON line it prints last."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.engine.build_cache import torch_extensions_dir

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import json, os
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TEST_PORT"], RANK="0", LOCAL_RANK="0",
                  WORLD_SIZE="1")
import torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
"""


def run_engine_script(script: str, port: int) -> dict:
    """`script` after a one-process gloo group is up (CPU accelerator); its last stdout line, parsed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "TEST_PORT": str(port),
           "TORCH_EXTENSIONS_DIR": torch_extensions_dir()}
    out = subprocess.run([sys.executable, "-c", PRELUDE + script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

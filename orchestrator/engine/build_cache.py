"""Where DeepSpeed's compiled ops (the CPU shm-comm op, 35-160 s to build on 2 cores) are cached, and which
ninja builds them, so that every stage after the first loads the op instead of building it again.

Two things made the op rebuild over and over on one machine, each costing every waiting worker the build:
- one cache folder shared by several checkouts: the build command names each environment's include
  paths, so each checkout found the other's build stale. The folder is now one per Python environment.
- two ninjas in one environment: Debian's (1.11) and the pip wheel's in the environment's bin folder
  (1.13) hash commands differently in the `.ninja_log` they share, so a process that found one ninja on
  its PATH rebuilt what a process with the other had built. The tests put the environment's bin folder
  first on PATH; `use_environment_build_tools` does the same in every worker.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def torch_extensions_dir() -> str:
    """$TORCH_EXTENSIONS_DIR, else one folder per Python environment under ~/.cache/bitmixer/torch_extensions."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    environment = hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:12]
    return str(Path.home() / ".cache" / "bitmixer" / "torch_extensions" / f"env-{environment}")


def use_environment_build_tools() -> None:
    """Put this Python environment's bin folder first on PATH (once), so an op build in this process runs
    the environment's own ninja, as every other process of the environment does."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

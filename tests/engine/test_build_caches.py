"""Where DeepSpeed's compiled ops are cached and which ninja builds them. On one machine the shm-comm op was
rebuilt over and over (35-160 s on 2 cores each time, workers waiting on the build lock): two checkouts
shared one cache folder, and processes of one environment ran two different ninjas (Debian's 1.11, the
pip wheel's 1.13) that hash commands differently in the `.ninja_log` they share."""
import os
import shutil
import sys
from pathlib import Path

from orchestrator.engine.build_cache import torch_extensions_dir, use_environment_build_tools


def test_each_python_environment_has_its_own_op_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "checkout-a" / ".venv"))
    first = torch_extensions_dir()
    assert torch_extensions_dir() == first  # stable: later runs of the same environment reuse the build
    assert Path(first).parent == Path.home() / ".cache" / "bitmixer" / "torch_extensions"
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "checkout-b" / ".venv"))
    assert torch_extensions_dir() != first


def test_an_explicit_torch_extensions_dir_is_used_as_given(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ops"))
    assert torch_extensions_dir() == str(tmp_path / "ops")


def test_an_op_build_runs_the_environments_own_ninja_whatever_path_the_process_started_with(monkeypatch, tmp_path):
    """A worker started with a PATH that lacks the environment's bin folder (Ray's workers, a driver run as
    `.venv/bin/python ...`) finds the same ninja as the tests do."""
    bin_dir = tmp_path / "env" / "bin"
    bin_dir.mkdir(parents=True)
    ninja = bin_dir / "ninja"
    ninja.write_text("#!/bin/sh\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    use_environment_build_tools()
    use_environment_build_tools()  # twice: the folder is not added again
    assert shutil.which("ninja") == str(ninja)
    assert os.environ["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/bin", "/bin"]

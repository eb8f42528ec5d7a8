"""Where DeepSpeed's compiled ops are cached: one folder per Python environment. Two checkouts (two virtual
environments) on one machine once shared a folder; the op's build command names each environment's paths,
so every switch between them rebuilt it (35-160 s on 2 cores, workers waiting on the build lock)."""
import sys
from pathlib import Path

from orchestrator.engine.stage import torch_extensions_dir


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

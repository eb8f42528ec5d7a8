"""Settings every test process shares: no telemetry, loopback-only collective traffic, a stable build cache."""
import os
import sys
from pathlib import Path

# Subprocesses started by tests (mlflow server, moto_server, ray) come from this virtual environment.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Ray Train's controller polls its workers every 2 s by default: a stage's end, a reported checkpoint and a dead
# worker are each seen up to 2 s late, in every one of the suite's few dozen stage runs. Tests poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# DeepSpeed compiles its CPU shared-memory comm op once per virtual environment; later runs reuse it from here.
if not os.environ.get("TORCH_EXTENSIONS_DIR"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from orchestrator.engine.build_cache import torch_extensions_dir  # noqa: E402
    os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir()


def pytest_collection_modifyitems(config, items):
    """Modules that start real processes (markers `faults`, `integration`) first, each module kept whole: with
    `.ci/run`'s two workers (pytest-xdist, one module at a time per worker) the longest modules start at
    once and the short ones fill in behind them, instead of one long module running alone at the end."""
    heavy = {item.module for item in items
             if item.get_closest_marker("faults") or item.get_closest_marker("integration")}
    items.sort(key=lambda item: item.module not in heavy)

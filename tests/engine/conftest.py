"""Shared fixtures of the engine tests. The repository root goes on sys.path so `tests.servers` imports
whichever way pytest was started (`pytest` alone does not put the working folder on the path)."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

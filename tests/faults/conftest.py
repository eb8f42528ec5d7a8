"""Fault tests: what a stop, a kill or a bad input leaves behind. The repository root goes on sys.path so
`tests.servers` imports however pytest was started. The embedded digits and an `mlflow server` are made once
for the package; a stage run in a thread and the wait for its pause are shared helpers."""
import os
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="package")
def digits(tmp_path_factory) -> str:
    """The embedded digits as a data folder, written once for the fault tests (none of them changes it)."""
    from orchestrator.data.embedded import write_embedded_digits
    return str(write_embedded_digits(tmp_path_factory.mktemp("digits") / "digits"))


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` process for the fault tests whose fault is not the server itself; each module
    logs into an experiment of its own."""
    from tests.servers import MLflowServer
    with MLflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def run_stage_in_thread(cfg, callbacks) -> tuple[threading.Thread, dict]:
    """Start run_stage(cfg) in a thread; the box receives its `result` or its `error`."""
    from orchestrator.engine import run_stage
    box: dict = {}

    def fit():
        try:
            box["result"] = run_stage(cfg, callbacks=callbacks)
        except BaseException as err:  # noqa: BLE001 - the test checks it
            box["error"] = err
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread, box


def wait_for_pause(marker: Path, thread: threading.Thread, box: dict, timeout_s: float = 600) -> None:
    """Poll until the stage paused after its first epoch (`marker` exists); fail at once if it ended."""
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        assert thread.is_alive(), box.get("error")
        assert time.monotonic() < deadline, "the stage never finished its first epoch"
        time.sleep(0.2)


def digits_stage(name: str, *, data: str, tracking_uri: str, storage_path: str, epochs: int, **settings):
    """The fault tests' stage: Stage I of resnet_tiny on the digits at 32 px, 2 workers of 0.5 CPU, logged in
    an experiment of its own name; `settings` (top-level StageConfig keys) change what a test needs."""
    from orchestrator.engine import StageConfig
    return StageConfig.model_validate({
        "name": name, "model": dict(name="resnet_tiny", num_classes=10, stem="small"),
        "data": dict(path=data, train_resolution=32, val_resolution=32, val_crop_ratio=1.0, batch_size=32,
                     num_workers=1),
        "optim": dict(epochs=epochs, warmup_epochs=0.5, lr_peak=5e-3), "policy": dict(stage="one"),
        "scaling": dict(num_workers=2, cpus_per_worker=0.5),
        "tracking": dict(tracking_uri=tracking_uri, experiment=name), "storage_path": storage_path,
        **settings})

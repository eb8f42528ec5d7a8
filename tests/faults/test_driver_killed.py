"""A driver killed mid-stage (SIGKILL, the whole process tree, as when its node goes): the re-run resumes
from the last checkpoint Ray recorded, not from epoch 0, trains only what was not trained, and a re-run
after a kill that came after the last checkpoint trains nothing and still ends FINISHED with its model.pt.

Real components: a local Ray per driver process, 2 Ray Train workers, DeepSpeed ZeRO-1 on gloo, FFCV on the
embedded digits, an `mlflow server` process. Each driver runs in its own session so that killing it kills
the Ray it started.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.faults]
EPOCHS = 2


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits, mlflow_server):
    return {"tmp": tmp_path_factory.mktemp("driver-killed"), "data": digits, "mlflow": mlflow_server}


def _config(env) -> dict:
    return dict(
        name="killed-driver",
        model=dict(name="resnet_tiny", num_classes=10, stem="small"),
        data=dict(path=env["data"], train_resolution=32, val_resolution=32, val_crop_ratio=1.0, batch_size=32,
                  num_workers=1),
        optim=dict(epochs=EPOCHS, warmup_epochs=0.5, lr_peak=5e-3),
        policy=dict(stage="one"),
        scaling=dict(num_workers=2, cpus_per_worker=0.5),
        tracking=dict(tracking_uri=env["mlflow"].uri, experiment="driver-killed"),
        eval_every_epochs=EPOCHS,  # evaluate at the end only: the epochs stay short
        storage_path=str(env["tmp"] / "ray"))


def _driver(env, name: str, pause_epoch: int | None = None):
    """Run a driver; with pause_epoch, kill its whole session once it paused after that epoch."""
    config, result, marker = (env["tmp"] / f"{name}.{suffix}" for suffix in ("config.json", "result.json", "paused"))
    config.write_text(json.dumps(_config(env)))
    argv = [sys.executable, "-m", "tests.faults.stage_driver", str(config), str(result)]
    argv += [str(pause_epoch), str(marker)] if pause_epoch is not None else []
    process_env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0",
                   "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(env["tmp"] / f"{name}.log", "wb")
    proc = subprocess.Popen(argv, cwd=ROOT, env=process_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while pause_epoch is not None and not marker.exists():
            assert proc.poll() is None, (env["tmp"] / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the driver never reached the pause"
            time.sleep(0.5)
        if pause_epoch is not None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
            proc.wait(timeout=60)
            return None
        assert proc.wait(timeout=900) == 0, (env["tmp"] / f"{name}.log").read_text()[-3000:]
        return json.loads(result.read_text())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _runs(env):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(env["mlflow"].uri)
    exp = client.get_experiment_by_name("driver-killed")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def _trained_epochs(client, run_id) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "sys/epoch_time_s"))


def test_killed_driver_resumes_from_its_last_checkpoint(env):
    """Killed after epoch 0's checkpoint: the re-run starts at epoch 1. Killed again after the last epoch's
    checkpoint but before the run was closed: the next re-run trains nothing, uploads the model.pt of that
    checkpoint and ends FINISHED. Across the three runs every epoch was trained exactly once."""
    _driver(env, "first", pause_epoch=0)
    _driver(env, "second", pause_epoch=EPOCHS - 1)
    third = _driver(env, "third")
    client, runs = _runs(env)
    assert len(runs) == 3
    first, second, last = runs
    assert _trained_epochs(client, first.info.run_id) == [0]
    assert _trained_epochs(client, second.info.run_id) == list(range(1, EPOCHS))  # resumed, not from epoch 0
    assert _trained_epochs(client, last.info.run_id) == []  # nothing left to train
    assert third["run_id"] == last.info.run_id
    final = client.get_run(last.info.run_id)
    assert final.info.status == "FINISHED" and final.data.tags["bitmixer.status"] == "FINISHED"
    assert "model.pt" in {a.path for a in client.list_artifacts(last.info.run_id)}
    from orchestrator.engine.checkpoint import read_model_pt
    model = read_model_pt(f"runs:/{last.info.run_id}/model.pt", env["mlflow"].uri)
    assert model["epoch"] == EPOCHS - 1 and model["stage"] == "one"

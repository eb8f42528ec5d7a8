"""SIGTERM to a running pipeline (a cancelled job, a CI timeout): `pipelines/full_paper.py` stops its local
Ray, marks the pipeline run and the open stage run KILLED (never left RUNNING), leaves no process behind and
frees the work dir; the re-run resumes the stage from its last recorded checkpoint, not from epoch 0.

Real components: the pipeline's own driver process, its local Ray, 2 Ray Train workers, DeepSpeed on gloo,
FFCV on the embedded digits, MLflow's sqlite store in the work dir.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.engine.callbacks import recorded
from tests.servers import left_in_session

from .conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.faults]
EPOCHS = 7  # short epochs; enough of them that SIGTERM lands mid-stage


def _config(tmp) -> str:
    raw = {"extends": str(ROOT / "pipelines" / "configs" / "embedded.yaml"), "name": "sigterm",
           "work_dir": str(tmp / "work"),
           "stages": {"one": {"epochs": EPOCHS, "warmup_epochs": 1, "eval_every": EPOCHS},
                      "two": {"enabled": False}, "three": {"enabled": False}},
           "architectures": [{"name": "resnet_tiny", "stem": "small"}],
           "sweep": {"enabled": False}, "baselines": {"independent": {"enabled": False}},
           "ablations": {"no_transitional_bn": False},
           "tracking": {"experiment": "sigterm", "register_models": False, "analysis_plots": False}}
    path = tmp / "sigterm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _start(tmp, config: str, name: str) -> subprocess.Popen:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "full_paper.py"), "--config", config],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _alive_in_session(sid: int) -> list[str]:
    """Ray's processes (raylet, GCS, workers) and Python processes still alive in the driver's session."""
    return left_in_session(sid, counts=lambda line: "ray" in line or "python" in line)


def test_sigterm_ends_runs_killed_and_the_rerun_resumes(tmp_path):
    from mlflow.tracking import MlflowClient
    config = _config(tmp_path)
    work = tmp_path / "work"
    proc = _start(tmp_path, config, "first")
    try:
        deadline = time.monotonic() + 600
        while not any(recorded(str(p.parent), 0) for p in (work / "ray_results").glob("*/checkpoint_manager_snapshot.json")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the stage never recorded its first epoch"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
        left = _alive_in_session(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "first.log").read_text()
    assert code == 143, log[-3000:]
    assert "stopped by SIGTERM: the runs still open were marked KILLED; run the same command again" in log
    assert left == [], left  # the local Ray and its workers went with the driver

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sigterm")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2, [(r.info.run_name, r.info.status) for r in runs]
    (stage,) = [r for r in runs if "bitmixer.config_hash" in r.data.tags]
    assert stage.data.tags["bitmixer.status"] == "KILLED"
    killed_epochs = sorted(m.step for m in client.get_metric_history(stage.info.run_id, "sys/epoch_time_s"))
    assert killed_epochs and killed_epochs[-1] < EPOCHS - 1  # stopped mid-stage

    rerun = _start(tmp_path, config, "second")
    try:
        assert rerun.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rerun.pid, signal.SIGKILL)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'")
    (finished,) = [r for r in runs if "bitmixer.config_hash" in r.data.tags]
    resumed = sorted(m.step for m in client.get_metric_history(finished.info.run_id, "sys/epoch_time_s"))
    assert resumed[0] >= 1 and resumed[-1] == EPOCHS - 1  # resumed from a checkpoint, not from epoch 0
    assert sorted(set(killed_epochs) | set(resumed)) == list(range(EPOCHS))
    assert "model.pt" in {a.path for a in client.list_artifacts(finished.info.run_id)}

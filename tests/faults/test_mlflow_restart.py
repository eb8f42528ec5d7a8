"""The MLflow server restarted mid-stage (stopped, then started again on the same store and port): the
stage finishes, every epoch recorded once, the run FINISHED with its model.pt (MLflow's client retries a
refused connection for minutes; a restart takes seconds).

Real components: a local Ray, 2 Ray Train workers, DeepSpeed on gloo, FFCV on the embedded digits, two
`mlflow server` processes one after the other on one sqlite store.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.engine.callbacks import PauseAfterFirstEpoch
from tests.servers import MLflowServer

from .conftest import digits_stage, run_stage_in_thread, wait_for_pause

pytestmark = [pytest.mark.integration, pytest.mark.faults]
EPOCHS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits):
    import ray

    tmp = tmp_path_factory.mktemp("mlflow-restart")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bitmixer" / "torch_extensions"))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield {"tmp": tmp, "data": digits}
    finally:
        ray.shutdown()


def test_stage_outlives_a_tracking_server_restart(env):
    from mlflow.tracking import MlflowClient

    store = env["tmp"] / "mlflow"
    server = MLflowServer(store)
    restarted = None
    try:
        cfg = digits_stage("mlflow-restart", data=env["data"], tracking_uri=server.uri,
                           storage_path=str(env["tmp"] / "ray"), epochs=EPOCHS, eval_every_epochs=1)
        marker, go = env["tmp"] / "paused", env["tmp"] / "go"
        thread, box = run_stage_in_thread(cfg, [PauseAfterFirstEpoch(str(marker), str(go))])
        wait_for_pause(marker, thread, box)
        server.stop()
        go.write_text("go")  # the next epoch's metrics are logged while the server is down
        time.sleep(5)
        restarted = MLflowServer(store, port=server.port)
        thread.join(timeout=900)
        assert not thread.is_alive() and "error" not in box, box.get("error")
        result = box["result"]
        client = MlflowClient(restarted.uri)
        run = client.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.tags["bitmixer.status"] == "FINISHED"
        assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
        history = client.get_metric_history(run.info.run_id, "sys/epoch_time_s")
        assert sorted(m.step for m in history) == list(range(EPOCHS))  # nothing lost, nothing twice
        assert result.metrics["resumed_at_epoch"] == -1  # the workers never had to restart
    finally:
        (restarted or server).stop()
        server.stop()

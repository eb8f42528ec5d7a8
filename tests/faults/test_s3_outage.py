"""S3 going away mid-stage (the checkpoint storage stops answering: moto's server is paused with SIGSTOP,
so what it holds survives): the stage fails with a clear error and its run ends FAILED; once S3 is back,
the re-run resumes from the last checkpoint it recorded there, not from epoch 0.

Real components: moto's S3 server on loopback as Ray Train's storage (s3://), a local Ray, 2 Ray Train
workers, DeepSpeed on gloo, FFCV on the embedded digits, an `mlflow server` process.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.engine.callbacks import PauseAfterFirstEpoch
from tests.servers import MotoServer

from .conftest import digits_stage, run_stage_in_thread, wait_for_pause

pytestmark = [pytest.mark.integration, pytest.mark.faults]
EPOCHS = 2
BUCKET = "checkpoints"


def recorded_in_s3(run_name: str, epoch: int) -> bool:
    import boto3
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    try:
        body = s3.get_object(Bucket=BUCKET, Key=f"ray/{run_name}/checkpoint_manager_snapshot.json")["Body"].read()
    except Exception:  # noqa: BLE001 - not there yet
        return False
    results = json.loads(body).get("checkpoint_results", [])
    return any(r.get("metrics", {}).get("epoch") == epoch for r in results)


def recorded_in_s3_by_worker(worker, epoch: int) -> bool:
    """Whether Ray has recorded the epoch's checkpoint in the bucket (the run named as the worker sees it)."""
    import ray.train
    return recorded_in_s3(ray.train.get_context().get_experiment_name(), epoch)


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits, mlflow_server):
    import ray

    tmp = tmp_path_factory.mktemp("s3-outage")
    with MotoServer(tmp / "moto") as s3:
        s3.create_bucket(BUCKET)
        saved = {k: os.environ.get(k) for k in s3.env}
        os.environ.update(s3.env)  # the driver and the workers Ray starts below reach S3 through these
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bitmixer" / "torch_extensions"))
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            yield {"tmp": tmp, "data": digits, "mlflow": mlflow_server, "s3": s3}
        finally:
            ray.shutdown()
            os.kill(s3.proc.pid, signal.SIGCONT)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def test_s3_outage_fails_clearly_and_the_rerun_resumes(env):
    from mlflow.tracking import MlflowClient

    from orchestrator.engine import run_stage
    from orchestrator.engine.stage import StorageUnreachable
    cfg = digits_stage("s3-outage", data=env["data"], tracking_uri=env["mlflow"].uri,
                       storage_path=f"s3://{BUCKET}/ray", epochs=EPOCHS, eval_every_epochs=EPOCHS, max_failures=0)
    marker, go = env["tmp"] / "paused", env["tmp"] / "go"
    thread, box = run_stage_in_thread(cfg, [PauseAfterFirstEpoch(str(marker), str(go), recorded_in_s3_by_worker)])
    wait_for_pause(marker, thread, box)
    os.kill(env["s3"].proc.pid, signal.SIGSTOP)  # S3 stops answering
    go.write_text("go")
    thread.join(timeout=900)
    os.kill(env["s3"].proc.pid, signal.SIGCONT)  # S3 is back, with what it held
    assert not thread.is_alive()
    error = box.get("error")
    assert isinstance(error, StorageUnreachable), repr(error)[:3000]
    assert str(error).startswith(f"stage s3-outage stopped: its checkpoint storage s3://{BUCKET}/ray did not "
                                 f"answer (AWS Error ")
    assert "then run again: the stage resumes from its last checkpoint recorded there" in str(error)
    client = MlflowClient(env["mlflow"].uri)
    exp = client.get_experiment_by_name("s3-outage")
    (failed,) = client.search_runs([exp.experiment_id])
    assert failed.info.status == "FAILED"

    result = run_stage(cfg)
    assert result.metrics["resumed_at_epoch"] == 1 and result.metrics["epoch"] == EPOCHS - 1
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}

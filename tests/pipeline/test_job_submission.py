"""The pipeline as a user runs it on a cluster: `ray job submit` against a real Ray head, an `mlflow server`
whose artifacts go to S3 (moto_server on loopback), Ray checkpoints in S3 too; then the same job again,
which must find every stage done and train nothing twice."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.servers import MLflowServer, MotoServer, free_port, stop_process_group, wait_for_http

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration

# A reduced embedded pipeline: resnet_tiny, Stage I -> II -> III with a 2-trial Tune sweep, one epoch each.
TINY = {
    "extends": str(ROOT / "pipelines" / "configs" / "embedded.yaml"),
    "name": "submitted",
    "stages": {"one": {"epochs": 1, "warmup_epochs": 0, "eval_every": 1},
               "two": {"epochs": 1, "warmup_epochs": 0, "eval_every": 1},
               "three": {"epochs": 1, "warmup_epochs": 0, "eval_every": 1, "ramp_epochs": 1}},
    "architectures": [{"name": "resnet_tiny", "stem": "small"}],
    "sweep": {"k": [0.6667, 0.8], "ramp_epochs": [1]},
    "baselines": {"independent": {"enabled": False}},
    "ablations": {"no_transitional_bn": False},
    "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "trial_cpus": 0.25},
}


class RayHead:
    """`ray start --head --block` on loopback in its own session; stopped by its PID, never `ray stop`."""

    def __init__(self, env: dict[str, str], workdir: Path):
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: socket paths are limited
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log_path = workdir / "ray_head.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
             "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             "--num-cpus=2", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
             # The job agent's port too (Ray's default 52365 is taken by any other head on the machine, and
             # `ray job submit` then finds "No available agent" until it gives up).
             f"--dashboard-agent-listen-port={free_port()}"],
            # On SIGTERM, `ray start --block` first drains the node for up to 30 s (for Serve replicas); this
            # head serves none, so it stops at once.
            env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, cwd=workdir, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_http(f"{self.address}/api/version", self.proc, self.log_path, timeout_s=120)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=30)
        with contextlib.suppress(ProcessLookupError):  # what outlived `ray start` in its session (the dashboard agent)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    with MotoServer(tmp / "moto") as s3:
        s3.create_bucket("mlflow")
        s3.create_bucket("checkpoints")
        with MLflowServer(tmp / "mlflow", artifacts_destination="s3://mlflow/artifacts", s3=s3) as mlf:
            env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "GLOO_SOCKET_IFNAME": "lo",
                   "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   # Ray's checkpoints go to the S3 endpoint through pyarrow/boto3 on every node.
                   **s3.env}
            env.pop("RAY_ADDRESS", None)
            head = RayHead(env, tmp)
            try:
                config = {**TINY, "work_dir": str(tmp / "work"),
                          "tracking": {"tracking_uri": mlf.uri, "experiment": "submitted",
                                       "storage_path": "s3://checkpoints/ray"}}
                config_path = tmp / "tiny.yaml"
                config_path.write_text(yaml.safe_dump(config))
                yield {"head": head, "mlflow": mlf, "s3": s3, "config": config_path, "env": env, "tmp": tmp}
            finally:
                head.stop()


def _submit(cluster, submission_id: str) -> str:
    """`ray job submit` as the README shows it; returns the job's logs once it has ended."""
    env = {k: v for k, v in cluster["env"].items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    argv = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster["head"].address, "--no-wait",
            "--submission-id", submission_id, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs", "*.db", "mlruns", "data"]}),
            "--", "python", "pipelines/full_paper.py", "--config", str(cluster["config"])]
    deadline = time.monotonic() + 300
    while True:
        out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        # The dashboard answers before the head's job agent is up; Ray says to try again.
        if out.returncode == 0 or "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout + out.stderr
    from ray.job_submission import JobStatus, JobSubmissionClient
    os.environ["RAY_AUTH_MODE"] = "disabled"
    client = JobSubmissionClient(cluster["head"].address)
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                   JobStatus.STOPPED):
        time.sleep(0.5)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, f"job {submission_id} ended {status}; its log ends with:\n{logs[-6000:]}"
    return logs


def _stage_runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], filter_string="tags.`bitmixer.config_hash` != ''", max_results=500)


def test_submitted_pipeline_reports_to_mlflow_and_s3_then_resubmission_trains_nothing(cluster):
    """A job submitted with `ray job submit` must run every stage, log the tables on its pipeline run
    (visible through the server's REST API and UI), put its artifacts in the S3 bucket, and register the
    final model; submitting the same config again must find every stage FINISHED by config hash and
    train none of them a second time."""
    from mlflow.tracking import MlflowClient
    mlf = cluster["mlflow"]
    logs = _submit(cluster, "bitmixer-first")
    print(logs[logs.find("Pipeline run"):])  # the summary, shown if the test fails
    assert "Table 7" in logs and "mlflow" in logs.lower()
    # A healthy run shows progress and tables, never a traceback (worker-group retries, Ray chatter).
    assert "Traceback" not in logs, logs[logs.find("Traceback") - 2000:logs.find("Traceback") + 2000]

    client = MlflowClient(tracking_uri=mlf.uri)
    exp = client.get_experiment_by_name("submitted")
    pipelines = client.search_runs([exp.experiment_id], filter_string="tags.`bitmixer.pipeline` = 'submitted'")
    assert len(pipelines) == 1 and pipelines[0].info.status == "FINISHED"
    run_id = pipelines[0].info.run_id
    stages = _stage_runs(client, exp.experiment_id)
    finished = [r for r in stages if r.data.tags.get("bitmixer.status") == "FINISHED"]
    assert len(finished) == 4, [r.info.run_name for r in stages]  # Stage I, Stage II, 2 sweep trials
    assert all(r.data.tags.get("mlflow.parentRunId") for r in finished)

    # The table artifact, listed through the REST API; the run's page in the UI answers.
    listed = requests.get(f"{mlf.uri}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id, "path": "tables"},
                          timeout=30)
    assert listed.status_code == 200
    names = {Path(f["path"]).name for f in listed.json()["files"]}
    assert {"table7.json", "table7.md", "table7.csv"} <= names
    page = requests.get(f"{mlf.uri}/#/experiments/{exp.experiment_id}/runs/{run_id}", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    local = client.download_artifacts(run_id, "tables/table7.json", str(cluster["tmp"]))
    table = json.loads(Path(local).read_text())  # log_table's form: {"columns": [...], "data": [[...]]}
    stage_three = table["columns"].index("Stage III (ours)")
    assert any(row[stage_three] != "–" for row in table["data"]), table  # a figure, not the missing mark
    headline = pipelines[0].data.metrics  # the comparison figures, named architecture / stage / bit-width
    assert {"resnet_tiny/stage3/top1_2bit", "resnet_tiny/stage3/rand", "resnet_tiny/stage2/top1_4bit"} <= set(headline)

    # Artifacts landed in the bucket behind the server; Ray's checkpoints in theirs.
    s3 = cluster["s3"].client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.endswith(f"{run_id}/artifacts/tables/table7.json") for k in keys), keys[:20]
    assert any(k.endswith("model.pt") for k in keys)
    assert s3.list_objects_v2(Bucket="checkpoints").get("KeyCount", 0) > 0

    # The best Stage III trial is the registered final model.
    versions = client.search_model_versions("name = 'bitmixer-submitted-resnet_tiny'")
    assert len(versions) == 1
    assert versions[0].run_id in {r.info.run_id for r in finished if r.info.run_name.startswith("stage3")}
    assert client.get_run(versions[0].run_id).data.tags.get("bitmixer.best_trial") == "true"
    assert "top1_2bit" in versions[0].tags and "resnet_tiny" in versions[0].description

    logs = _submit(cluster, "bitmixer-second")
    print(logs[logs.find("Pipeline run"):])
    again = _stage_runs(client, exp.experiment_id)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in stages), "a stage trained twice"
    assert "(3 found done, 0 failed" in logs, "the re-submission did not find every stage done"
    assert len(client.search_model_versions("name = 'bitmixer-submitted-resnet_tiny'")) == 1

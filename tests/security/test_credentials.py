"""Tracking credentials never leak: a tracking URI written as http://user:secret@host is read once, its
credentials move to MLflow's MLFLOW_TRACKING_USERNAME / PASSWORD variables, and the secret never appears in
stdout, stderr, an MLflow param or a config artifact of the stage run.

Against a real `mlflow server --app-name basic-auth` on 127.0.0.1 (its own auth database, an admin user
with the secret password, nothing readable without it). The stage's driver side runs for real up to the
point where it would start Ray (`run_stage`: reachability check, config hash, the MLflow run with its params
and config/stage.yaml, the FAILED close on error); rank 0's logger then writes into the run with the
credentials it finds in the environment, as a Ray worker inheriting it does.
"""
from __future__ import annotations

import base64
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking.credentials import (PASSWORD_VARIABLE, USERNAME_VARIABLE, redact_text, redact_tree,
                                               redact_uri, split_credentials)
from tests.servers import _executable, _Server, free_port, wait_for_http

pytestmark = pytest.mark.integration

USER = "pipeline"
SECRET = "Tr4cking-S3cret-Passw0rd"  # the MLflow auth app wants 12 characters or more


class BasicAuthMLflowServer(_Server):
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with a sqlite run store and its own auth database;
    `USER` is its admin, with the password `SECRET`, and unauthenticated users get no permission."""

    def __init__(self, workdir: Path, timeout_s: float = 120.0):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.uri_with_credentials = f"http://{USER}:{SECRET}@127.0.0.1:{self.port}"
        config = workdir / "basic_auth.ini"
        config.write_text("[mlflow]\n"
                          "default_permission = NO_PERMISSIONS\n"
                          f"database_uri = sqlite:///{workdir / 'auth.db'}\n"
                          f"admin_username = {USER}\n"
                          f"admin_password = {SECRET}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # the auth app's CSRF key
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for name in (USERNAME_VARIABLE, PASSWORD_VARIABLE):
            env.pop(name, None)
        argv = [_executable("mlflow"), "server", "--app-name", "basic-auth",
                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination", (workdir / "artifacts").as_uri(), "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self._spawn(argv, env, workdir / "mlflow_server.log", workdir)
        try:
            wait_for_http(f"{self.uri}/health", self.proc, self.log_path, timeout_s)
        except BaseException:
            self.stop()
            raise


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with BasicAuthMLflowServer(tmp_path_factory.mktemp("basic-auth-mlflow")) as running:
        yield running


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """The embedded digits as a data folder (a stage checks its data before it opens its run)."""
    from orchestrator.data.embedded import write_embedded_digits
    return str(write_embedded_digits(tmp_path_factory.mktemp("data") / "digits"))


@pytest.fixture
def no_tracking_credentials():
    """The credentials may come from the URI only; the variables are restored afterwards."""
    saved = {name: os.environ.pop(name, None) for name in (USERNAME_VARIABLE, PASSWORD_VARIABLE)}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


def _search_experiments(uri: str, authorization: str | None = None) -> int:
    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_redaction_of_uris_and_configs():
    """userinfo is dropped and secret query values replaced; nothing else of the URI changes."""
    assert redact_uri(f"http://{USER}:{SECRET}@mlflow.bitmixer.svc:5000/") == "http://mlflow.bitmixer.svc:5000/"
    assert redact_uri("s3://bucket/k?X-Amz-Signature=abc&versionId=3") == "s3://bucket/k?X-Amz-Signature=REDACTED&versionId=3"
    assert redact_uri("https://h/api?token=abc") == "https://h/api?token=REDACTED"
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_uri("runs:/abc/model.pt") == "runs:/abc/model.pt"
    assert split_credentials(f"https://a%40b:{SECRET}@h:5000/x") == ("https://h:5000/x", "a@b", SECRET)
    tree = {"tracking": {"tracking_uri": f"http://{USER}:{SECRET}@h:5000"}, "list": [f"s3://k:{SECRET}@b/x", 3]}
    assert SECRET not in str(redact_tree(tree))
    assert SECRET not in redact_text(f"failed: POST http://{USER}:{SECRET}@h:5000/api/2.0 (401)")


def test_a_refused_storage_path_is_quoted_without_its_credentials():
    """storage_path with a scheme Ray cannot write to is refused in a sentence that names it without its
    userinfo."""
    from orchestrator.engine.config import check_storage_path

    with pytest.raises(ValueError, match="neither a local folder") as info:
        check_storage_path(f"ftp://{USER}:{SECRET}@files.example.com/checkpoints")
    assert SECRET not in str(info.value) and "ftp://files.example.com/checkpoints" in str(info.value)


def test_server_refuses_unauthenticated_clients(server):
    """The shipped setting is closed: without credentials the API answers 401, with them 200."""
    assert _search_experiments(server.uri) == 401
    token = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
    assert _search_experiments(server.uri, f"Basic {token}") == 200


def test_reachability_check_reads_credentials_in_the_uri(server, no_tracking_credentials):
    """urllib cannot open http://user:secret@host (it reads 'secret@...' as a port): the check must send
    the credentials as a header and report the running server reachable; an unreachable one is reported
    without the password."""
    from orchestrator.tracking.config import TrackingConfig
    from orchestrator.tracking.reachability import (TrackingUnreachable, check_tracking_reachable,
                                                    health_request)

    raw = TrackingConfig.model_construct(tracking_uri=server.uri_with_credentials, connect_timeout_s=10.0)
    check_tracking_reachable(raw)  # the raw URI, as a config built without validation would hold it
    request = health_request(server.uri_with_credentials)
    assert request.full_url == f"{server.uri}/health"
    assert base64.b64decode(request.get_header("Authorization").split()[1]).decode() == f"{USER}:{SECRET}"
    closed = TrackingConfig.model_construct(tracking_uri=f"http://{USER}:{SECRET}@127.0.0.1:{free_port()}",
                                            connect_timeout_s=2.0)
    with pytest.raises(TrackingUnreachable) as info:
        check_tracking_reachable(closed)
    assert SECRET not in str(info.value) and "127.0.0.1" in str(info.value)


def _stage_config(tmp_path: Path, tracking_uri: str, data: str):
    from orchestrator.engine.config import StageConfig
    return StageConfig.model_validate(dict(  # as a YAML preset would give it
        name="credentials-stage", model=dict(name="resnet_tiny", num_classes=10, stem="small"),
        data=dict(path=data, batch_size=32), policy=dict(stage="one"),
        tracking=dict(tracking_uri=tracking_uri, experiment="credentials"),
        storage_path=str(tmp_path / "ray")))


class _StopBeforeRay(RuntimeError):
    pass


def test_stage_run_never_shows_the_password(server, digits, tmp_path, monkeypatch, capfd, no_tracking_credentials):
    """run_stage with tracking_uri http://user:secret@... : the run is created (the credentials worked),
    its params and config/stage.yaml name the server without them, the config handed to the workers has
    none, rank 0's logger authenticates from the environment, and stdout/stderr never show the secret."""
    from mlflow.tracking import MlflowClient

    import orchestrator.engine.stage as stage

    handed_to_workers = {}

    def stop_before_ray(cfg):
        handed_to_workers.update(cfg.model_dump(mode="json"))
        print(f"[test] stopping {cfg.name} before Ray; tracking at {cfg.tracking.tracking_uri}", flush=True)
        raise _StopBeforeRay("Ray is not started by this test")

    monkeypatch.setattr(stage, "_ensure_ray", stop_before_ray)
    cfg = _stage_config(tmp_path, server.uri_with_credentials, digits)
    assert cfg.tracking.tracking_uri == server.uri
    assert os.environ[USERNAME_VARIABLE] == USER and os.environ[PASSWORD_VARIABLE] == SECRET
    with pytest.raises(_StopBeforeRay):
        stage.run_stage(cfg)
    assert SECRET not in str(handed_to_workers)

    client = MlflowClient(tracking_uri=server.uri)  # authenticates from MLFLOW_TRACKING_USERNAME / PASSWORD
    experiment = client.get_experiment_by_name("credentials")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["tracking.tracking_uri"] == server.uri
    assert run.info.status == "FAILED"  # run_stage closed it on the error, through the same credentials
    assert not any(SECRET in value or f"{USER}:" in value for value in run.data.params.values())
    assert not any(SECRET in value for value in run.data.tags.values())

    from orchestrator.tracking.stage_run import RunLogger
    RunLogger(server.uri, run.info.run_id).metrics({"train_loss": 1.5}, step=0)  # what rank 0 does
    assert client.get_run(run.info.run_id).data.metrics["train_loss"] == 1.5

    stage_yaml = client.download_artifacts(run.info.run_id, "config/stage.yaml", str(tmp_path))
    text = Path(stage_yaml).read_text()
    assert server.uri in text and SECRET not in text
    for path in Path(tmp_path).rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path

    out, err = capfd.readouterr()
    assert "stopping credentials-stage before Ray" in out
    assert SECRET not in out and SECRET not in err


def test_a_real_stage_run_never_shows_the_password(server, digits, tmp_path, no_tracking_credentials):
    """One real stage (local Ray, 2 Train workers, DeepSpeed, FFCV, 1 epoch on the embedded digits) against
    the basic-auth server with tracking_uri http://user:secret@..., driven as a user drives it: by a process
    of its own that reads the config (so its Ray processes inherit the credentials from its environment). It
    finishes (rank 0 logged metrics, tables and model.pt with those credentials), and the secret is in none
    of the driver's output (the workers' output included), the run's params, tags or text artifacts."""
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[2]
    config, result_file = tmp_path / "stage.json", tmp_path / "result.json"
    config.write_text(json.dumps(dict(
        name="credentials-real-stage", model=dict(name="resnet_tiny", num_classes=10, stem="small"),
        data=dict(path=digits, train_resolution=32, val_resolution=32, val_crop_ratio=1.0, batch_size=32,
                  num_workers=1),
        optim=dict(epochs=1, warmup_epochs=0.5, lr_peak=5e-3), policy=dict(stage="one"),
        scaling=dict(num_workers=2, cpus_per_worker=0.5),
        tracking=dict(tracking_uri=server.uri_with_credentials, experiment="credentials-real"),
        storage_path=str(tmp_path / "ray"))))
    driver = subprocess.run([sys.executable, "-m", "tests.faults.stage_driver", str(config), str(result_file)],
                            cwd=root, capture_output=True, text=True, timeout=800)
    out, err = driver.stdout, driver.stderr
    assert driver.returncode == 0, (out + err)[-6000:].replace(SECRET, "<the secret>")
    result = json.loads(result_file.read_text())
    os.environ[USERNAME_VARIABLE], os.environ[PASSWORD_VARIABLE] = USER, SECRET  # the checks read as the admin
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics  # rank 0 logged its epoch through the auth
    assert not any(SECRET in v for v in [*run.data.params.values(), *run.data.tags.values()])
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    names = {str(p.relative_to(downloaded)) for p in downloaded.rglob("*") if p.is_file()}
    assert "model.pt" in names and "config/stage.yaml" in names
    for path in downloaded.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".txt", ".md", ".csv"):
            assert SECRET not in path.read_text(errors="replace"), path
    assert "credentials-real-stage" in out + err  # the progress lines were captured
    assert SECRET not in out and SECRET not in err

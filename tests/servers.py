"""Real server processes for integration tests: an `mlflow server` (sqlite backend, optional S3 artifacts)
and a `moto_server` speaking the S3 API, both on 127.0.0.1 at free ports.

Each server runs in its own session (process group) so that stopping it by its PID also stops the workers
it forked; nothing is ever stopped by name.

    with MotoServer() as s3:                       # S3 on loopback
        s3.create_bucket("artifacts")
        with MLflowServer(tmp_path, artifacts_destination="s3://artifacts/mlflow", s3=s3) as mlf:
            mlflow.set_tracking_uri(mlf.uri)
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# Dummy credentials: moto accepts anything, and they keep boto3 from looking for real ones.
S3_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _executable(name: str) -> str:
    """The console script `name` from the interpreter's own environment (the venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"`{name}` is not installed in this environment; run infra/setup.sh first.")
    return found


def wait_for_http(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 90.0,
                  ok_statuses: tuple[int, ...] = (200,)) -> None:
    """Poll `url` until it answers with one of `ok_statuses`; fail early (with the server's log) if the
    process exits first, or after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode} before answering; "
                               f"its log ends with:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status in ok_statuses:
                    return
        except urllib.error.HTTPError as err:
            if err.code in ok_statuses:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server for {url} did not answer within {timeout_s:.0f} s; "
                               f"its log ends with:\n{_tail(log_path)}")
        time.sleep(0.25)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def left_in_session(session: int, counts=lambda line: True, settle_s: float = 10.0) -> list[str]:
    """`ps` lines ("STAT ARGS") of the session's live processes that `counts`, once the session has had up to
    `settle_s` to empty. Zombies are dead. Python's resource tracker outlives its parent on purpose (to free
    shared memory) and exits when it sees the parent gone; a process in the middle of exiting shows its name
    in brackets ("[python]"), its command line released. Waiting a little lets those finish, while a process
    that was meant to stop and did not stays listed."""
    def alive() -> list[str]:
        out = subprocess.run(["ps", "-o", "stat=,args=", "-s", str(session)], capture_output=True, text=True).stdout
        return [line for line in out.splitlines()
                if not line.startswith("Z") and "resource_tracker" not in line and counts(line)]

    left, deadline = alive(), time.monotonic() + settle_s
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive()
    return left


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a server started with start_new_session=True: SIGTERM to its group (its PID), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=grace_s)


class _Server:
    """A child process in its own session with its output in a log file; a context manager."""

    proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self._log.close()
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return _tail(self.log_path, 200)


class MotoServer(_Server):
    """`moto_server` on 127.0.0.1: an S3 HTTP endpoint for tests (`endpoint_url`, `env`, `create_bucket`)."""

    def __init__(self, workdir: str | os.PathLike | None = None, timeout_s: float = 60.0):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="moto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **S3_TEST_CREDENTIALS}
        self._spawn([_executable("moto_server"), "-H", "127.0.0.1", "-p", str(self.port)], env,
                    self.workdir / "moto_server.log", self.workdir)
        try:
            wait_for_http(f"{self.endpoint_url}/moto-api/", self.proc, self.log_path, timeout_s)
        except BaseException:
            self.stop()
            raise

    @property
    def env(self) -> dict[str, str]:
        """Variables that point boto3 / MLflow / Ray at this server."""
        return {**S3_TEST_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


_EMPTY_STORE: list[Path] = []  # this process's empty sqlite store at the installed MLflow's schema


def _empty_store() -> Path:
    """An empty MLflow sqlite store (schema migrated, the Default experiment at `mlflow-artifacts:/0`, as a
    server with `--serve-artifacts` makes it), made once per test process. A new server starts from a copy
    of it and skips MLflow's schema migrations, which otherwise take seconds at every server's start."""
    if not _EMPTY_STORE:
        import atexit

        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        folder = Path(tempfile.mkdtemp(prefix="mlflow-empty-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", "mlflow-artifacts:/")
        store.engine.dispose()
        _EMPTY_STORE.append(folder / "mlflow.db")
    return _EMPTY_STORE[0]


class MLflowServer(_Server):
    """`mlflow server` on 127.0.0.1 with a sqlite backend store, proxying artifacts (`--serve-artifacts`).

    artifacts_destination: "s3://bucket/prefix" (pass the MotoServer as `s3`; only the server gets the S3
    variables) or None for a local folder under `workdir`. `uri` is the tracking URI for clients.
    """

    def __init__(self, workdir: str | os.PathLike | None = None, *, artifacts_destination: str | None = None,
                 s3: MotoServer | None = None, timeout_s: float = 120.0, extra_env: dict | None = None,
                 port: int | None = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mlflow-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()  # a port of its own; the same one to restart a server on its store
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_store_uri = f"sqlite:///{self.workdir / 'mlflow.db'}"
        if not (self.workdir / "mlflow.db").exists():  # a restart keeps its store
            shutil.copyfile(_empty_store(), self.workdir / "mlflow.db")
        self.artifacts_destination = artifacts_destination or (self.workdir / "artifacts").as_uri()
        # Job execution starts five huey consumer processes (~230 MB and a share of CPU each) that tracking
        # never uses: off, on a 2-core machine.
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               **(s3.env if s3 else {}), **(extra_env or {})}
        argv = [_executable("mlflow"), "server", "--backend-store-uri", self.backend_store_uri,
                "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self._spawn(argv, env, self.workdir / "mlflow_server.log", self.workdir)
        try:
            wait_for_http(f"{self.uri}/health", self.proc, self.log_path, timeout_s)
        except BaseException:
            self.stop()
            raise

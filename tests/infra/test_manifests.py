"""The cluster files in infra/ cannot run here; these tests parse each one and check the fields that
would break a launch: the entrypoint, the images (pinned to the Ray/MLflow of pyproject.toml), the
resources and the ports."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def _pinned(name: str) -> str:
    """The version pyproject.toml pins for a package (e.g. ray[...]==2.60.0 -> '2.60.0')."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{name}(?:\[[^\]]*\])?(?:==|>=)([0-9.]+)"', text)
    assert match, f"pyproject.toml does not pin {name}"
    return match.group(1)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    docs = [d for d in yaml.safe_load_all((INFRA / "kuberay-rayjob.yaml").read_text()) if d]
    return next(d for d in docs if d["kind"] == "RayJob")


def test_launcher_runs_ray_of_the_project_on_gpu_workers(launcher):
    """The launcher's image must carry the Ray version the project pins (a driver and a cluster on
    different Ray versions refuse to talk), the workers must be GPU nodes, and the head must run the
    job server on 8265 with token auth (Ray 2.60's default, which `ray job submit` expects), on its
    loopback only (`ray dashboard` tunnels to it over SSH)."""
    assert launcher["provider"]["type"] == "aws"
    assert f":{_pinned('ray')}-" in launcher["docker"]["image"] and "gpu" in launcher["docker"]["image"]
    workers = launcher["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] >= 1
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"]["CPU"] == 0
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-port=8265" in head and "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "--port=6379" in head
    assert any("infra/setup.sh" in c for c in launcher["setup_commands"])


def test_rayjob_runs_full_paper_on_an_existing_preset(rayjob):
    """The RayJob's entrypoint must run pipelines/full_paper.py with a preset that exists in the repo,
    and its Ray version must be the pinned one."""
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "pipelines/full_paper.py"]
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"the RayJob names {config}, which is not in the repo"
    assert spec["rayClusterSpec"]["rayVersion"] == _pinned("ray")
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")


def test_rayjob_head_ports_and_gpu_workers(rayjob):
    """The head must publish the GCS (6379), dashboard/job server (8265) and client (10001) ports; the
    worker group must request and limit the same whole number of GPUs, with /dev/shm in memory."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001}
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    group = cluster["workerGroupSpecs"][0]
    pod = group["template"]["spec"]
    worker = pod["containers"][0]
    gpus = worker["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and worker["resources"]["requests"]["nvidia.com/gpu"] == gpus
    assert worker["image"] == head["image"], "head and workers must run the same image"
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert "/dev/shm" in mounts
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _mlflow_server_args(argv: list[str]) -> dict[str, str]:
    assert argv[:2] == ["mlflow", "server"], argv
    return {argv[i]: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            for i in range(2, len(argv)) if argv[i].startswith("--")}


def test_mlflow_compose_uses_postgres_and_proxied_s3():
    """The MLflow server must keep runs in Postgres, proxy artifacts to S3 (clients then need no AWS
    credentials) and listen on 5000 (published on the host's loopback); its image is built from the
    Dockerfile that adds psycopg2."""
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    server = compose["services"]["mlflow"]
    args = _mlflow_server_args(server["command"])
    assert args["--backend-store-uri"].startswith("postgresql://")
    assert "@postgres:5432/" in args["--backend-store-uri"]
    assert "s3://" in args["--artifacts-destination"] and "--serve-artifacts" in args
    assert args["--port"] == "5000" and "127.0.0.1:5000:5000" in server["ports"]
    assert compose["services"]["postgres"]["image"].startswith("postgres:")
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    assert f"mlflow:v{_pinned('mlflow')}" in dockerfile and "psycopg2" in dockerfile


def test_mlflow_kubernetes_service_matches_what_the_job_reports_to(rayjob):
    """The in-cluster MLflow Service must be the host and port that the RayJob and imagenet.yaml use,
    with the Postgres backend and S3 artifacts."""
    docs = [d for d in yaml.safe_load_all((INFRA / "mlflow" / "kubernetes.yaml").read_text()) if d]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    service = by_name[("Service", "mlflow")]
    port = service["spec"]["ports"][0]["port"]
    url = f"http://mlflow.{service['metadata']['namespace']}.svc:{port}"
    assert yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"] == url
    imagenet = yaml.safe_load((ROOT / "pipelines" / "configs" / "imagenet.yaml").read_text())
    assert imagenet["tracking"]["tracking_uri"] == url
    container = by_name[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    args = _mlflow_server_args(shlex.split(container["args"][0].removeprefix("exec ")))
    assert args["--backend-store-uri"].startswith("postgresql://")
    assert args["--artifacts-destination"].startswith("s3://") and "--serve-artifacts" in args
    assert args["--port"] == str(container["ports"][0]["containerPort"]) == str(port)
    assert by_name[("Service", "mlflow-postgres")]["spec"]["ports"][0]["port"] == 5432


def test_rayjob_every_ray_process_shares_one_token(rayjob):
    """With token authentication on, the head, the workers and the submitter pod must all read the same
    token, or workers cannot join and the job cannot be submitted."""
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
                  *(g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]),
                  spec["submitterPodTemplate"]["spec"]["containers"][0]]
    sources = set()
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        sources.add((ref["name"], ref["key"]))
    assert len(sources) == 1

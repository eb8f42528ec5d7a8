"""The cluster files keep the trust boundaries of the README's "Security" section:

- no MLflow server is reachable without authentication, and none is published on all interfaces;
- Kubernetes: NetworkPolicies admit only the pipeline's Ray pods to MLflow and only MLflow to Postgres;
- AWS: the head has its own least-privilege instance profile, the buckets are versioned, private and
  writable only by the pipeline's roles;
- the Ray job server has a token, created once and distributed to every node by the launcher;
- uploads leave out .venv, runs/, data, databases and .env (checked with rsync and Ray's own matcher);
- the KubeRay head, where the pipeline's driver runs, mounts the shared volume its work_dir is on.
"""
from __future__ import annotations

import configparser
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
RAY_LABEL = "bitmixer.io/ray-cluster"


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob_docs() -> list[dict]:
    return _documents(INFRA / "kuberay-rayjob.yaml")


@pytest.fixture(scope="module")
def rayjob(rayjob_docs) -> dict:
    return next(d for d in rayjob_docs if d["kind"] == "RayJob")


@pytest.fixture(scope="module")
def mlflow_k8s() -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in _documents(INFRA / "mlflow" / "kubernetes.yaml")}


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((INFRA / "aws" / "security.yaml").read_text())


def _mlflow_server_argv(text: str) -> list[list[str]]:
    """Every `mlflow server ...` command line in a file (YAML lists or shell strings)."""
    found = []
    for doc in yaml.safe_load_all(text):
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                if node[:2] == ["mlflow", "server"]:
                    found.append([str(a) for a in node])
                else:
                    stack.extend(node)
            elif isinstance(node, str) and "mlflow server" in node:
                argv = shlex.split(node.replace("exec ", ""))
                found.append(argv[argv.index("mlflow"):])
    return found


def test_no_mlflow_server_without_authentication():
    """Every MLflow server that infra/ starts runs MLflow's basic-auth app; the auth settings it mounts
    hold no password and give unknown users nothing to write."""
    commands = [argv for path in INFRA.rglob("*.yaml") for argv in _mlflow_server_argv(path.read_text())]
    assert len(commands) >= 2, "expected the compose and the Kubernetes MLflow servers"
    for argv in commands:
        assert argv[argv.index("--app-name") + 1] == "basic-auth", argv
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert "admin_password" not in ini["mlflow"], "the admin password belongs in a secret, not in the repo"
    assert "mlflow[auth]" in (INFRA / "mlflow" / "Dockerfile").read_text()


def test_compose_publishes_mlflow_on_loopback_only():
    """docker compose publishes MLflow on the host's 127.0.0.1 (never 0.0.0.0 or all interfaces), Postgres
    not at all, and demands its secrets instead of defaulting them."""
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host's loopback"
    assert "ports" not in compose["services"]["postgres"]
    env = compose["services"]["mlflow"]["environment"]
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert ":?" in env[key], f"{key} must be required, not defaulted"
    assert ":?" in compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]


def test_kubernetes_network_policies_close_mlflow_and_postgres(mlflow_k8s, rayjob):
    """MLflow admits only pods carrying the Ray cluster's label, which the RayJob's head and workers do
    carry; Postgres admits only MLflow."""
    policy = mlflow_k8s[("NetworkPolicy", "mlflow")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app": "mlflow"} and policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    admitted = source["podSelector"]["matchLabels"]
    assert set(admitted) == {RAY_LABEL} and "namespaceSelector" not in source
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        assert template["metadata"]["labels"][RAY_LABEL] == admitted[RAY_LABEL]
    postgres = mlflow_k8s[("NetworkPolicy", "mlflow-postgres")]["spec"]
    assert postgres["podSelector"]["matchLabels"] == {"app": "mlflow-postgres"}
    assert [s["podSelector"]["matchLabels"] for r in postgres["ingress"] for s in r["from"]] == [{"app": "mlflow"}]


def test_kubernetes_network_policy_closes_the_ray_cluster(rayjob_docs, rayjob):
    """The Ray pods (dashboard, job server, GCS) accept traffic from each other and the dashboard port from
    the KubeRay operator's namespace, nothing else."""
    policy = next(d for d in rayjob_docs if d["kind"] == "NetworkPolicy")["spec"]
    label = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"][RAY_LABEL]
    assert policy["podSelector"]["matchLabels"] == {RAY_LABEL: label} and policy["policyTypes"] == ["Ingress"]
    assert rayjob["spec"]["submitterPodTemplate"]["metadata"]["labels"][RAY_LABEL] == label
    for rule in policy["ingress"]:
        for source in rule["from"]:
            if "podSelector" in source:
                assert source["podSelector"]["matchLabels"] == {RAY_LABEL: label}
            else:
                assert rule["ports"] == [{"port": 8265, "protocol": "TCP"}]


def test_aws_head_has_its_own_least_privilege_instance_profile(launcher, aws):
    """The head names an instance profile (without one Ray gives it EC2 and S3 full access) that
    infra/aws/security.yaml defines: no wildcard action, EC2 changes only on this cluster's tagged
    instances, PassRole only for the worker role."""
    head = launcher["available_node_types"][launcher["head_node_type"]]["node_config"]
    worker = launcher["available_node_types"]["gpu_worker"]["node_config"]
    head_profile = head["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
    worker_profile = worker["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
    assert head_profile != worker_profile
    resources = aws["Resources"]
    profiles = {r["Properties"]["InstanceProfileName"]: r["Properties"]["Roles"][0]["Ref"]
                for r in resources.values() if r["Type"] == "AWS::IAM::InstanceProfile"}
    assert head_profile in profiles and worker_profile in profiles
    assert aws["Parameters"]["ClusterName"]["Default"] == launcher["cluster_name"]
    head_statements = [s for p in resources[profiles[head_profile]]["Properties"]["Policies"]
                       for s in p["PolicyDocument"]["Statement"]]
    for statement in head_statements:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert statement["Effect"] == "Allow"
        assert not any(a == "*" or a.endswith(":*") for a in actions), statement
        if any(a in ("ec2:TerminateInstances", "ec2:StopInstances") for a in actions):
            assert "ec2:ResourceTag/ray-cluster-name" in statement["Condition"]["StringEquals"]
        if "iam:PassRole" in actions:
            assert statement["Resource"] == [{"Fn::GetAtt": [profiles[worker_profile], "Arn"]},
                                             {"Fn::GetAtt": ["RayWorkerInstanceProfile", "Arn"]}]
    worker_actions = {a for p in resources[profiles[worker_profile]]["Properties"]["Policies"]
                      for s in p["PolicyDocument"]["Statement"] for a in s["Action"]}
    assert all(a.startswith("s3:") for a in worker_actions)


def test_buckets_versioned_private_and_written_only_by_the_pipeline(aws):
    """Both buckets: versioning on, all four public-access blocks, and a policy that denies object writes
    to every principal but the pipeline's roles. The bucket names are the ones the presets use."""
    resources = aws["Resources"]
    buckets = {name: r for name, r in resources.items() if r["Type"] == "AWS::S3::Bucket"}
    assert set(buckets) == {"CheckpointBucket", "ArtifactBucket"}
    for name, bucket in buckets.items():
        props = bucket["Properties"]
        assert props["VersioningConfiguration"]["Status"] == "Enabled", name
        assert all(props["PublicAccessBlockConfiguration"][k] is True for k in
                   ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")), name
    writers = {}
    for resource in resources.values():
        if resource["Type"] != "AWS::S3::BucketPolicy":
            continue
        bucket = resource["Properties"]["Bucket"]["Ref"]
        (deny,) = [s for s in resource["Properties"]["PolicyDocument"]["Statement"]
                   if s["Effect"] == "Deny" and "s3:PutObject" in s["Action"]]
        assert deny["Principal"] == "*" and "s3:DeleteObject" in deny["Action"]
        writers[bucket] = {ref["Fn::GetAtt"][0] for ref in deny["Condition"]["ArnNotEquals"]["aws:PrincipalArn"]}
    assert writers == {"CheckpointBucket": {"RayHeadRole", "RayWorkerRole"}, "ArtifactBucket": {"MLflowServerRole"}}
    imagenet = yaml.safe_load((ROOT / "pipelines" / "configs" / "imagenet.yaml").read_text())
    assert imagenet["tracking"]["storage_path"].startswith(f"s3://{aws['Parameters']['CheckpointBucketName']['Default']}/")
    k8s_args = " ".join(_mlflow_server_argv((INFRA / "mlflow" / "kubernetes.yaml").read_text())[0])
    assert f"s3://{aws['Parameters']['ArtifactBucketName']['Default']}/" in k8s_args


def test_launcher_distributes_one_job_server_token(launcher):
    """The token file made by `ray get-auth-token --generate` is mounted on every node at the path the
    head's and the workers' `ray start` read, with token authentication on; the head refuses to start
    without it."""
    mounts = launcher["file_mounts"]
    token_path = next(remote for remote, local in mounts.items() if local == "~/.ray/auth_token")
    for command in (launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]):
        assert "RAY_AUTH_MODE=token" in command and f"RAY_AUTH_TOKEN_PATH={token_path}" in command
    assert any(f"test -s {token_path}" in c for c in launcher["head_setup_commands"])
    assert "ray get-auth-token --generate" in (INFRA / "ray-cluster-aws.yaml").read_text()


def test_rayjob_mlflow_credentials_come_from_a_secret(rayjob):
    """The head (the driver) and the workers read the MLflow user from a Secret; the tracking URI in
    the job's environment carries no credentials."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
                  *(g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"])]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[name]["valueFrom"], (container["name"], name)
    tracking_uri = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    assert "@" not in tracking_uri


def test_kuberay_head_mounts_the_shared_volume(rayjob):
    """The pipeline's driver runs on the head and writes its work_dir there: the head mounts the same
    claim as the workers at the work_dir's volume, and the data read-only at data.path."""
    imagenet = yaml.safe_load((ROOT / "pipelines" / "configs" / "imagenet.yaml").read_text())
    cluster = rayjob["spec"]["rayClusterSpec"]
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    worker_pod = cluster["workerGroupSpecs"][0]["template"]["spec"]
    claims = lambda pod: {v["name"]: v["persistentVolumeClaim"]["claimName"]  # noqa: E731
                          for v in pod["volumes"] if "persistentVolumeClaim" in v}
    head_mounts = {m["mountPath"]: m for m in head_pod["containers"][0]["volumeMounts"]}
    work = next(m for path, m in head_mounts.items() if imagenet["work_dir"].startswith(path + "/"))
    assert not work.get("readOnly", False)
    assert claims(head_pod)[work["name"]] == claims(worker_pod)[work["name"]]
    data = next(m for path, m in head_mounts.items() if imagenet["data"]["path"] == path)
    assert data["readOnly"] is True


def _scratch_tree(root: Path) -> Path:
    """A working tree with what must go (code, also under a folder named data) and what must not."""
    files = ["pipelines/full_paper.py", "orchestrator/data/beton.py", "tests/data/helpers.py",
             "infra/mlflow/docker-compose.yaml",
             ".venv/bin/python", "runs/stage1/model.pt", "data/digits/train.beton", "mlruns.db",
             "mlruns/0/meta.yaml", ".env", "infra/mlflow/.env", ".git/config"]
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    (root / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    return root


KEPT = {"pipelines/full_paper.py", "orchestrator/data/beton.py", "tests/data/helpers.py",
        "infra/mlflow/docker-compose.yaml"}
LEFT_OUT = {".venv/bin/python", "runs/stage1/model.pt", "data/digits/train.beton", "mlruns.db",
            "mlruns/0/meta.yaml", ".env", "infra/mlflow/.env"}


def test_launcher_upload_leaves_out_secrets_and_bulk(launcher, tmp_path):
    """`ray up` uploads file_mounts with rsync and the launcher's rsync_exclude / rsync_filter: run rsync
    with exactly the arguments Ray builds from them, on a scratch tree."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    assert launcher["file_mounts"]["/home/ray/bitmixer"] == "."
    source = _scratch_tree(tmp_path / "src")
    target = tmp_path / "node"
    args = SSHCommandRunner._create_rsync_filter_args(None, {"rsync_exclude": launcher["rsync_exclude"],
                                                             "rsync_filter": launcher["rsync_filter"]})
    subprocess.run(["rsync", "-a", *args, f"{source}/", str(target)], check=True, capture_output=True, timeout=60)
    uploaded = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert KEPT <= uploaded
    assert not uploaded & LEFT_OUT, uploaded & LEFT_OUT


@pytest.mark.parametrize("which", ["job-runtime-env.yaml", "kuberay-rayjob.yaml"])
def test_job_upload_leaves_out_secrets_and_bulk(which, tmp_path):
    """A job's working dir is packaged with the runtime env's `excludes`, matched by Ray's own code
    (gitignore-style, from the working dir): code stays (orchestrator/data too), the rest goes."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    if which == "job-runtime-env.yaml":
        runtime_env = yaml.safe_load((INFRA / which).read_text())
    else:
        job = next(d for d in _documents(INFRA / which) if d["kind"] == "RayJob")
        runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    source = _scratch_tree(tmp_path / "src")
    packaged = set()
    # include_gitignore=False: the excludes alone must do it (the image's /app need not hold a .gitignore).
    _dir_travel(source, [_get_excludes(source, runtime_env["excludes"])],
                lambda p: packaged.add(str(p.relative_to(source))) if p.is_file() else None,
                include_gitignore=False)
    assert KEPT <= packaged
    assert not packaged & LEFT_OUT, packaged & LEFT_OUT


def test_env_files_are_ignored_by_git():
    """infra/mlflow asks for secrets in a .env: git must never track one."""
    for name in (".env", "infra/mlflow/.env"):
        done = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert done.returncode == 0, f"{name} is not ignored by .gitignore"

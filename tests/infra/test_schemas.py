"""The cluster files in infra/ validated against the schemas their owners publish, not only field by field:

- infra/ray-cluster-aws.yaml against the JSON schema Ray ships for its cluster launcher
  (ray/autoscaler/ray-schema.json, the one `ray up` validates with);
- every Kubernetes core resource (StatefulSet, Deployment, Service, PersistentVolumeClaim, ServiceAccount,
  NetworkPolicy) with kubernetes-validate, strictly (unknown fields are errors). The RayJob is a KubeRay
  custom resource, for which kubernetes-validate has no schema, so it is skipped as a whole; its head,
  worker and submitter pod templates are core PodTemplateSpecs and are validated as such;
- the job runtime environments (infra/job-runtime-env.yaml and the RayJob's runtimeEnvYAML) by Ray's own
  RuntimeEnv, which refuses unknown fields;
- infra/aws/security.yaml with cfn-lint, against AWS CloudFormation's resource schemas.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERNETES_FILES = [INFRA / "mlflow" / "kubernetes.yaml", INFRA / "kuberay-rayjob.yaml"]


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_launcher_matches_rays_schema():
    """ray up refuses a launcher YAML that its schema rejects; a wrong key or type fails here first."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_schema_check_would_catch_a_wrong_launcher():
    """Guard of the guard: a misspelt top-level key is an error under Ray's schema."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())
    config["rsync_excludes"] = config.pop("rsync_exclude")
    assert list(jsonschema.Draft7Validator(schema).iter_errors(config))


@pytest.mark.parametrize("path", KUBERNETES_FILES, ids=lambda p: p.name)
def test_kubernetes_core_resources_match_the_api_schema(path):
    """Every core resource validates strictly against the Kubernetes API schema (kubernetes-validate's
    newest version); the RayJob custom resource is left to the next test."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    checked = 0
    for doc in _documents(path):
        if doc["apiVersion"].startswith("ray.io/"):
            continue  # a KubeRay CRD: no schema in kubernetes-validate
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked >= 1


def test_rayjob_pod_templates_are_valid_pod_template_specs():
    """The head, worker and submitter templates inside the RayJob are core PodTemplateSpecs: validated as
    the `template` of a v1 PodTemplate (strict), so a misplaced volume or env entry is caught."""
    import kubernetes_validate

    rayjob = next(d for d in _documents(INFRA / "kuberay-rayjob.yaml") if d["kind"] == "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = {"head": cluster["headGroupSpec"]["template"], "submitter": rayjob["spec"]["submitterPodTemplate"],
                 **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}
    version = kubernetes_validate.latest_version()
    for name, template in templates.items():
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"bitmixer-{name}"},
                        "template": template}
        kubernetes_validate.validate(pod_template, version, strict=True)


def test_job_runtime_environments_are_valid_for_ray():
    """Ray's RuntimeEnv accepts the job's runtime environment of the launcher and of the RayJob (their
    working dir, `.` at submission and /app in the image, is this repository; RuntimeEnv wants it to exist)."""
    from ray.runtime_env import RuntimeEnv

    rayjob = next(d for d in _documents(INFRA / "kuberay-rayjob.yaml") if d["kind"] == "RayJob")
    for runtime_env in (yaml.safe_load((INFRA / "job-runtime-env.yaml").read_text()),
                        yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])):
        env = RuntimeEnv(**{**runtime_env, "working_dir": str(ROOT)})
        assert env.get("excludes") == runtime_env["excludes"]


def test_aws_template_passes_cfn_lint():
    """The buckets and roles template is valid CloudFormation (resource schemas, references, policies)."""
    from cfnlint.api import lint_file

    matches = lint_file(INFRA / "aws" / "security.yaml")
    assert not matches, [str(m) for m in matches]

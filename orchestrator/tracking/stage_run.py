"""The MLflow run of one stage.

The driver opens it (experiment, nesting under the pipeline run, tags, the full resolved config as flattened
params and as a YAML artifact) before any worker starts, and closes it with `bitmixer.status=FINISHED`;
rank 0 logs into it through `RunLogger` (per-epoch metrics, per-bit tables, model.pt). Only MlflowClient is
used, never the fluent global run, so nothing leaks between stages run in one process.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from orchestrator.tracking.credentials import redact_tree

TAG_STAGE = "bitmixer.stage"
TAG_ARCHITECTURE = "bitmixer.architecture"
TAG_CONFIG_HASH = "bitmixer.config_hash"
TAG_STATUS = "bitmixer.status"
TAG_GIT_COMMIT = "bitmixer.git_commit"
TAG_CODE_DIGEST = "bitmixer.code_sha256"  # sha256 of bitmixer_core + orchestrator sources (see code_digest)
TAG_INIT_DIGEST = "bitmixer.init_state_sha256"  # sha256 of the weights loaded from init_from
TAG_INDEPENDENT_BITS = "bitmixer.independent_bits"  # the bit-width an Independent network trained at
STAGE_INDEPENDENT = "independent"  # stage tag of the Independent baseline (core.STAGES key)
STATUS_RUNNING, STATUS_FINISHED, STATUS_FAILED = "RUNNING", "FINISHED", "FAILED"
# MLflow 3's UI opens an experiment in its GenAI view unless this tag names model training.
TAG_EXPERIMENT_KIND, KIND_MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
TAG_DESCRIPTION = "mlflow.note.content"  # a run's or an experiment's description in the UI
STATUS_KILLED = "KILLED"  # stopped from outside (SIGTERM, Ctrl-C, an ASHA stop, a dead driver)
MODEL_ARTIFACT = "model.pt"


class ModelNotLogged(RuntimeError):
    """A run about to be marked FINISHED has no model.pt artifact."""


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=tracking_uri)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """One MLflow param per setting: {"optim": {"lr_peak": 0.001}} -> {"optim.lr_peak": "0.001"}; a list of
    settings groups gets its index as a key ({"architectures": [{"name": "r"}]} -> {"architectures.0.name":
    "r"}); a list of plain values stays one param ("[2, 3, 4]")."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and any(isinstance(item, dict) for item in value):
            flat.update(flatten({str(i): item for i, item in enumerate(value)}, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def git_commit() -> str | None:
    """The commit of the checkout the code runs from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_digest() -> str:
    """sha256 of the method's and the orchestrator's source files (a code version outside a git checkout)."""
    import hashlib
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for package in ("bitmixer_core", "orchestrator"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version_tags() -> dict[str, str]:
    """The code version every run carries: the git commit when there is one, and a digest of the source."""
    tags = {TAG_CODE_DIGEST: code_digest()}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def experiment_id(tracking_uri: str, name: str) -> str:
    """Get or create the experiment (two stages racing to create it: the loser reads the winner's)."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        created = client.create_experiment(name)
        describe_experiment(client, created)
        return created
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def describe_experiment(client, experiment_id: str, description: str | None = None) -> None:
    """Tag the experiment for the UI's model-training view, and give it a description."""
    client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, KIND_MODEL_TRAINING)
    if description:
        client.set_experiment_tag(experiment_id, TAG_DESCRIPTION, description)


def open_stage_run(*, tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None,
                   resolved_config: dict, tags: dict[str, str]) -> str:
    """Create the stage's run, tag it, and record the resolved config; returns the run id."""
    from mlflow.entities import Param
    client = _client(tracking_uri)
    all_tags = {TAG_STATUS: STATUS_RUNNING, **tags}
    if all_tags.get(TAG_STAGE) == STAGE_INDEPENDENT:  # a network trained at one bit-width
        all_tags[TAG_INDEPENDENT_BITS] = str(resolved_config.get("policy", {}).get("fixed_bits"))
    all_tags.update(code_version_tags())
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(tracking_uri, experiment), tags=all_tags, run_name=run_name)
    run_id = run.info.run_id
    resolved_config = redact_tree(resolved_config)  # no URI credentials in a param or in config/stage.yaml
    params = [Param(k, v[:6000]) for k, v in sorted(flatten(resolved_config).items())]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start:start + 100])
    client.log_text(run_id, yaml.safe_dump(resolved_config, sort_keys=False), "config/stage.yaml")
    return run_id


def has_model(tracking_uri: str, run_id: str) -> bool:
    """Whether the run's artifacts hold model.pt (what a FINISHED stage hands to the next one)."""
    return any(a.path == MODEL_ARTIFACT for a in _client(tracking_uri).list_artifacts(run_id))


def publish_model(tracking_uri: str, run_id: str, model_path: str | Path) -> None:
    """Log model.pt into the run unless it is there: a stage resumed at its last epoch trains nothing and
    its workers log nothing, so the driver uploads the model of the checkpoint it resumed from."""
    if not has_model(tracking_uri, run_id):
        _client(tracking_uri).log_artifact(run_id, str(model_path))


def close_stage_run(tracking_uri: str, run_id: str, *, succeeded: bool, status: str | None = None) -> None:
    """End the run. FINISHED (what the pipeline looks for to skip a stage already done) is given only to a
    run whose model.pt is logged; otherwise the run ends FAILED and ModelNotLogged is raised. `status`
    KILLED or FAILED overrides for a run that did not succeed. The run's last evaluation is already its
    metrics' latest value: nothing is logged twice."""
    client = _client(tracking_uri)
    if succeeded and not has_model(tracking_uri, run_id):
        client.set_tag(run_id, TAG_STATUS, STATUS_FAILED)
        client.set_terminated(run_id, status="FAILED")
        raise ModelNotLogged(f"MLflow run {run_id} has no {MODEL_ARTIFACT} artifact, so it is marked FAILED, not "
                             f"FINISHED; run the stage again (it resumes from its last checkpoint).")
    final = STATUS_FINISHED if succeeded else (status or STATUS_FAILED)
    client.set_tag(run_id, TAG_STATUS, final)
    client.set_terminated(run_id, status=final)


def find_finished_run(tracking_uri: str, experiment: str, config_hash: str) -> str | None:
    """Run id of the newest FINISHED stage run with this config hash whose model.pt is there, or None."""
    client = _client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id],
                              filter_string=f"tags.`{TAG_CONFIG_HASH}` = '{config_hash}' and "
                                            f"tags.`{TAG_STATUS}` = '{STATUS_FINISHED}'",
                              max_results=20, order_by=["attributes.start_time DESC"])
    return next((run.info.run_id for run in runs if has_model(tracking_uri, run.info.run_id)), None)


def end_open_runs(tracking_uri: str, parent_run_id: str, status: str = STATUS_KILLED) -> list[str]:
    """Mark every still-RUNNING run nested (at any depth) under `parent_run_id` as `status`: the runs of
    stages, sweeps and trials whose processes are gone (a stopped driver, an ASHA-stopped trial)."""
    client = _client(tracking_uri)
    parent = client.get_run(parent_run_id)
    ended, frontier = [], [parent_run_id]
    while frontier:
        current = frontier.pop()
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{current}'", max_results=1000)
        for child in children:
            frontier.append(child.info.run_id)
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, TAG_STATUS, status)
                client.set_terminated(child.info.run_id, status=status)
                ended.append(child.info.run_id)
    return ended


class RunLogger:
    """What rank 0 logs into the stage's run."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = _client(tracking_uri), run_id

    def metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric
        import time
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def table(self, columns: dict, artifact_file: str) -> None:
        self.client.log_table(self.run_id, data=columns, artifact_file=artifact_file)

    def artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

"""Tracking rules that need no Ray: an unreachable tracking store fails the stage at start with one
sentence; a stage run's params, tags and FINISHED lookup work on a real (sqlite) MLflow store."""
import pytest

from orchestrator.engine import StageConfig
from orchestrator.tracking.reachability import TrackingUnreachable
from tests.servers import free_port


def config(tracking_uri: str, tmp_path) -> StageConfig:
    return StageConfig.model_validate(dict(
        name="unreachable",
        model=dict(name="resnet_tiny", num_classes=10, stem="small"),
        data=dict(path=str(tmp_path / "no-data"), batch_size=8, num_workers=1),
        optim=dict(epochs=1, warmup_epochs=0),
        policy=dict(stage="one"),
        tracking=dict(tracking_uri=tracking_uri, connect_timeout_s=3),
        storage_path=str(tmp_path / "ray"),
    ))


def test_unreachable_server_fails_at_start_in_one_sentence(tmp_path):
    """A tracking server nobody listens on stops run_stage before any Ray worker starts, with one
    sentence naming the URI and the setting to fix."""
    import ray

    from orchestrator.engine import run_stage
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnreachable) as info:
        run_stage(config(uri, tmp_path))
    message = str(info.value)
    assert message.startswith(f"The MLflow tracking server at {uri} is unreachable")
    assert "tracking.tracking_uri" in message and message.count(". ") == 0
    assert not ray.is_initialized()  # failed before starting Ray


def test_missing_sqlite_folder_fails_at_start(tmp_path):
    """A sqlite store in a folder that does not exist is named, with what to do."""
    from orchestrator.engine import run_stage
    uri = f"sqlite:///{tmp_path}/missing/mlruns.db"
    with pytest.raises(TrackingUnreachable, match="does not exist; create it or fix tracking.tracking_uri"):
        run_stage(config(uri, tmp_path))


def test_stage_run_records_config_and_is_found_when_finished(tmp_path):
    """open_stage_run stores the flattened resolved config and the config hash; find_finished_run finds the
    run by hash only once it is closed as FINISHED (what the pipeline uses to skip a finished stage)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.engine import config_hash
    from orchestrator.tracking.stage_run import (TAG_CONFIG_HASH, close_stage_run, find_finished_run,
                                                 flatten, open_stage_run)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    MlflowClient(uri).create_experiment("t", artifact_location=(tmp_path / "artifacts").as_uri())
    cfg = config(uri, tmp_path)
    digest = config_hash(cfg)
    resolved = cfg.model_dump(mode="json")
    run_id = open_stage_run(tracking_uri=uri, experiment="t", run_name="s", parent_run_id=None,
                            resolved_config=resolved, tags={TAG_CONFIG_HASH: digest})
    assert find_finished_run(uri, "t", digest) is None
    (tmp_path / "model.pt").write_bytes(b"weights")  # FINISHED needs the model
    MlflowClient(uri).log_artifact(run_id, str(tmp_path / "model.pt"))
    close_stage_run(uri, run_id, succeeded=True)
    assert find_finished_run(uri, "t", digest) == run_id
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params == flatten(resolved)
    assert run.data.params["model.name"] == "resnet_tiny"
    assert not any(k.startswith("final_") for k in run.data.metrics)  # nothing logged twice
    assert flatten({"a": {"b": [1, 2], "c": None}}) == {"a.b": "[1, 2]", "a.c": "None"}

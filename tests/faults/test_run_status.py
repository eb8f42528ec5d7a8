"""FINISHED means a model exists, and no run stays RUNNING: checked on a real `mlflow server` process,
without Ray (the stage's training is replaced where it would start Ray)."""
from __future__ import annotations

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


@pytest.fixture()
def client(server):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=server.uri)


def _run(client, experiment: str, parent: str | None = None, **tags) -> str:
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client.create_run(exp_id, tags=tags).info.run_id


def _model_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights")
    return path


def test_a_run_without_model_pt_is_never_finished(server, client, request):
    """close_stage_run(succeeded=True) on a run that has no model.pt marks it FAILED (tag and MLflow status)
    and says so in one sentence; once model.pt is logged the same close gives FINISHED."""
    from orchestrator.tracking.stage_run import ModelNotLogged, close_stage_run
    run_id = _run(client, request.node.name)
    with pytest.raises(ModelNotLogged, match=f"MLflow run {run_id} has no model.pt artifact, so it is marked "
                                             f"FAILED, not FINISHED; run the stage again"):
        close_stage_run(server.uri, run_id, succeeded=True)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["bitmixer.status"] == "FAILED"


def test_publish_model_uploads_once_then_finished(server, client, request, tmp_path):
    """A stage resumed at its last epoch logs nothing from its workers: the driver's publish_model uploads the
    checkpoint's model.pt, once; then the run can be FINISHED."""
    from orchestrator.tracking.stage_run import close_stage_run, has_model, publish_model
    run_id = _run(client, request.node.name)
    model = _model_file(tmp_path)
    assert not has_model(server.uri, run_id)
    publish_model(server.uri, run_id, model)
    publish_model(server.uri, run_id, model)
    assert [a.path for a in client.list_artifacts(run_id)] == ["model.pt"]
    close_stage_run(server.uri, run_id, succeeded=True)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["bitmixer.status"] == "FINISHED"


def test_skip_needs_the_model_artifact(server, client, request, tmp_path):
    """A run tagged FINISHED whose model.pt is missing (the failure of the issue: closed before the model was
    logged) is not taken for done; an older FINISHED run of the same hash that has its model is."""
    from orchestrator.tracking.stage_run import find_finished_run
    experiment = request.node.name
    with_model = _run(client, experiment, **{"bitmixer.config_hash": "h1", "bitmixer.status": "FINISHED"})
    client.log_artifact(with_model, str(_model_file(tmp_path)))
    client.set_terminated(with_model, "FINISHED")
    without = _run(client, experiment, **{"bitmixer.config_hash": "h1", "bitmixer.status": "FINISHED"})
    client.set_terminated(without, "FINISHED")
    assert find_finished_run(server.uri, experiment, "h1") == with_model
    lonely = _run(client, experiment, **{"bitmixer.config_hash": "h2", "bitmixer.status": "FINISHED"})
    client.set_terminated(lonely, "FINISHED")
    assert find_finished_run(server.uri, experiment, "h2") is None


def test_open_runs_under_a_run_end_killed(server, client, request):
    """end_open_runs ends every RUNNING run nested under a pipeline run (stage, sweep, trial) as KILLED and
    leaves a FINISHED one as it was."""
    from orchestrator.tracking.stage_run import end_open_runs
    experiment = request.node.name
    pipeline = _run(client, experiment)
    stage = _run(client, experiment, pipeline)
    done = _run(client, experiment, pipeline)
    client.set_terminated(done, "FINISHED")
    sweep = _run(client, experiment, pipeline)
    trial = _run(client, experiment, sweep)
    assert sorted(end_open_runs(server.uri, pipeline)) == sorted([stage, sweep, trial])
    for run_id in (stage, sweep, trial):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["bitmixer.status"] == "KILLED"
    assert client.get_run(done).info.status == "FINISHED"


def test_trials_the_scheduler_stopped_end_killed_even_when_their_stage_closed_them_failed(server, client, request):
    """A trial ASHA stopped (no error, stage not completed) ends KILLED, also when its stage closed the run FAILED
    while Tune tore the trial down; a completed trial, a failed trial and a run that finished just before its
    trial was stopped keep their status."""
    from types import SimpleNamespace

    from orchestrator.pipeline.sweep import COMPLETED, end_stopped_trials
    experiment = request.node.name
    open_run, closed_failed, finished_late, completed, errored = (_run(client, experiment) for _ in range(5))
    client.set_terminated(closed_failed, "FAILED")
    for run_id in (finished_late, completed):
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(errored, "FAILED")
    results = [SimpleNamespace(error=None, metrics={"run_id": open_run, COMPLETED: False}),
               SimpleNamespace(error=None, metrics={"run_id": closed_failed, COMPLETED: False}),
               SimpleNamespace(error=None, metrics={"run_id": finished_late, COMPLETED: False}),
               SimpleNamespace(error=None, metrics={"run_id": completed, COMPLETED: True}),
               SimpleNamespace(error=RuntimeError("worker died"), metrics={"run_id": errored, COMPLETED: False}),
               SimpleNamespace(error=None, metrics={})]  # stopped before its stage opened a run
    assert sorted(end_stopped_trials(server.uri, results)) == sorted([open_run, closed_failed])
    for run_id in (open_run, closed_failed):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["bitmixer.status"] == "KILLED"
    assert [client.get_run(r).info.status for r in (finished_late, completed, errored)] == ["FINISHED", "FINISHED",
                                                                                          "FAILED"]


def _stage_config(server, tmp_path, experiment, data):
    from orchestrator.engine import StageConfig
    return StageConfig.model_validate(dict(
        name="status", model=dict(name="resnet_tiny", num_classes=10, stem="small"),
        data=dict(path=str(data), batch_size=8, num_workers=1), optim=dict(epochs=1, warmup_epochs=0),
        policy=dict(stage="one"), tracking=dict(tracking_uri=server.uri, experiment=experiment),
        storage_path=str(tmp_path / "ray")))


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "KILLED"), (SystemExit(143), "KILLED"),
                                           (RuntimeError("worker group lost"), "FAILED")])
def test_a_stopped_or_failed_stage_run_is_closed(server, client, tmp_path, monkeypatch, request, error, status,
                                                 digits):
    """Closing the run is part of the stage's error handling: a stage stopped by Ctrl-C or SIGTERM (SystemExit)
    ends KILLED, a stage whose training raised ends FAILED, and the error reaches the caller unchanged."""
    from orchestrator.engine import run_stage
    from orchestrator.engine import stage as stage_module

    def stop(_cfg):
        raise error
    monkeypatch.setattr(stage_module, "_ensure_ray", stop)
    cfg = _stage_config(server, tmp_path, f"status-{request.node.callspec.id}", digits)
    with pytest.raises(type(error)):
        run_stage(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == status and run.data.tags["bitmixer.status"] == status


def test_second_pipeline_on_a_work_dir_is_refused(tmp_path):
    """While one pipeline holds the work dir, a second is refused at once with a sentence naming the folder
    and what to do; after the first ends, the work dir is free again."""
    from orchestrator.pipeline.integrity import WorkDirBusy, work_dir_lock
    with work_dir_lock(tmp_path):
        with pytest.raises(WorkDirBusy, match=f"another pipeline \\(pid \\d+ on .*\\) is running in the work dir "
                                              f"{tmp_path}; wait for it to end or give this one another work_dir"):
            with work_dir_lock(tmp_path):
                pass
    with work_dir_lock(tmp_path):
        pass


def test_runs_of_a_killed_pipeline_are_ended_by_the_next(server, client, request, tmp_path):
    """A pipeline killed with SIGKILL leaves its run and its stage's run RUNNING. The next pipeline on the same
    work dir (holding its lock, so the other is dead) marks both KILLED; a RUNNING pipeline of another work
    dir is left alone."""
    from orchestrator.pipeline.integrity import TAG_WORK_DIR, end_stale_runs
    experiment = request.node.name
    dead = _run(client, experiment, **{TAG_WORK_DIR: str(tmp_path / "a")})
    stage = _run(client, experiment, dead)
    other = _run(client, experiment, **{TAG_WORK_DIR: str(tmp_path / "b")})
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    assert sorted(end_stale_runs(server.uri, exp_id, tmp_path / "a")) == sorted([dead, stage])
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(stage).info.status == "KILLED"
    assert client.get_run(other).info.status == "RUNNING"


def test_sigterm_of_the_driver_ends_the_pipeline_and_its_stages_killed(server, client, tmp_path, monkeypatch):
    """SIGTERM reaches the driver (full_paper.py turns it into SystemExit) while a stage's run is open: the
    pipeline run and the stage run end KILLED, none stays RUNNING, and the work dir is free again."""
    from orchestrator.pipeline import app
    from orchestrator.pipeline.config import load_pipeline_config
    from orchestrator.pipeline.integrity import work_dir_lock
    from orchestrator.tracking.stage_run import open_stage_run
    cfg = load_pipeline_config(ROOT / "pipelines" / "configs" / "embedded.yaml")
    cfg.work_dir = str(tmp_path / "work")
    cfg.tracking.tracking_uri = server.uri
    cfg.tracking.experiment = "sigterm"
    opened = {}

    def run_plan(plan, pipeline, *, parent_run_id, **_):
        opened["stage"] = open_stage_run(tracking_uri=server.uri, experiment="sigterm", run_name="stage",
                                         parent_run_id=parent_run_id, resolved_config={}, tags={})
        opened["pipeline"] = parent_run_id
        raise SystemExit(143)  # what full_paper.py's SIGTERM handler raises
    monkeypatch.setattr(app, "_connect_ray", lambda env_vars: False)
    monkeypatch.setattr("orchestrator.pipeline.runner.run_plan", run_plan)
    with pytest.raises(SystemExit):
        app.run_pipeline(cfg, log=lambda *_: None)
    for which in ("pipeline", "stage"):
        assert client.get_run(opened[which]).info.status == "KILLED", which
    assert client.get_run(opened["stage"]).data.tags["bitmixer.status"] == "KILLED"
    with work_dir_lock(cfg.resolved_work_dir()):
        pass


def test_a_stale_build_lock_is_removed(tmp_path):
    """A DeepSpeed op build stopped half-way leaves `lock` in the torch extensions cache, and torch then waits
    for it forever: a lock older than any build is removed before a worker loads DeepSpeed; a fresh one (a
    build under way) is left alone."""
    import os
    import time

    from orchestrator.engine.worker import clear_stale_build_locks
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.write_bytes(b"")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert clear_stale_build_locks(tmp_path) == [stale]
    assert not stale.exists() and fresh.exists()

"""Re-submission and failure rules of the stage DAG, checked on a real (sqlite) MLflow store without Ray:
a stage whose config hash has a FINISHED run is not trained again; a failed stage blocks the rest of its
chain, naming the stage that failed."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.engine.config import config_hash
from orchestrator.pipeline.config import load_pipeline_config
from orchestrator.pipeline.outcome import BLOCKED, FAILED, FINISHED, SKIPPED, StageOutcome, finished_outcome
from orchestrator.pipeline.plan import build_plan
from orchestrator.pipeline.runner import execute_node, resolve_stage_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # One sqlite store for the module (creating one costs seconds); each test has its own experiment.
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def setup(store, request, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg = load_pipeline_config(CONFIGS / "embedded.yaml")
    cfg.tracking.experiment = f"test-{request.node.name}"
    return cfg, build_plan(cfg, data_path="/data", tracking_uri=store), store


def _record(uri: str, experiment: str, digest: str, status: str, metrics: dict) -> str:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    folder = Path(uri.removeprefix("sqlite:///")).parent
    exp_id = exp.experiment_id if exp else client.create_experiment(
        experiment, artifact_location=(folder / "artifacts" / experiment).as_uri())
    run = client.create_run(exp_id, tags={"bitmixer.config_hash": digest, "bitmixer.status": status})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    if status == "FINISHED":  # a FINISHED stage always has its model
        model = folder / "model.pt"
        model.write_bytes(b"weights")
        client.log_artifact(run.info.run_id, str(model))
    return run.info.run_id


def test_finished_stage_is_skipped_and_hands_on_its_model(setup, monkeypatch):
    """A stage whose resolved config hash has a FINISHED run must not train again: its outcome is
    `skipped`, with that run's model URI and final metrics."""
    cfg, plan, uri = setup
    node = plan.nodes["resnet_tiny/main/one"]
    digest = config_hash(resolve_stage_config(node, {}, parent_run_id=None))
    _record(uri, cfg.tracking.experiment, digest, "RUNNING", {"val/top1_4bit": 1.0})  # an interrupted try
    run_id = _record(uri, cfg.tracking.experiment, digest, "FINISHED",
                     {"val/top1_4bit": 91.5, "val/rand_top1_mean": 88.0})

    def must_not_train(_cfg, **_):
        raise AssertionError("run_stage was called for a stage that already FINISHED")
    monkeypatch.setattr("orchestrator.engine.stage.run_stage", must_not_train)
    outcome = execute_node(node, [], parent_run_id="parent", pipeline=cfg)
    assert outcome.status == SKIPPED, outcome.error
    assert outcome.run_id == run_id and outcome.model_uri == f"runs:/{run_id}/model.pt"
    assert outcome.metrics["val/top1_4bit"] == 91.5 and outcome.metrics["val/rand_top1_mean"] == 88.0


def test_unfinished_stage_is_not_taken_for_done(setup):
    """Only FINISHED runs count: a RUNNING (interrupted) or FAILED run of the same hash means train again."""
    cfg, plan, uri = setup
    node = plan.nodes["resnet_tiny/main/one"]
    digest = config_hash(resolve_stage_config(node, {}, parent_run_id=None))
    _record(uri, cfg.tracking.experiment, digest, "RUNNING", {})
    _record(uri, cfg.tracking.experiment, digest, "FAILED", {})
    assert finished_outcome(node.key, uri, cfg.tracking.experiment, digest) is None


def test_config_hash_follows_the_upstream_model(setup):
    """The next stage's hash covers the model it starts from: the same upstream run gives the same hash
    (so a re-submission finds it), another upstream run gives another hash (so it retrains), and the
    pipeline run it nests under does not matter."""
    _, plan, _ = setup
    node = plan.nodes["resnet_tiny/main/two"]
    up = lambda run: {"resnet_tiny/main/one": StageOutcome("resnet_tiny/main/one", FINISHED, run, f"runs:/{run}/model.pt")}
    a = resolve_stage_config(node, up("aaa"), parent_run_id="p1")
    assert a.init_from == "runs:/aaa/model.pt"
    assert config_hash(a) == config_hash(resolve_stage_config(node, up("aaa"), parent_run_id="p2"))
    assert config_hash(a) != config_hash(resolve_stage_config(node, up("bbb"), parent_run_id="p1"))


def test_failed_stage_blocks_its_chain_and_names_the_cause(setup):
    """A stage after a failed one is `blocked` without running, and says which stage failed; a stage two
    steps down names the original failure, not the blocked stage in between."""
    cfg, plan, _ = setup
    failed = StageOutcome("resnet_tiny/main/one", FAILED, error="RuntimeError: loader died")
    two = execute_node(plan.nodes["resnet_tiny/main/two"], [failed], parent_run_id=None, pipeline=cfg)
    assert two.status == BLOCKED and two.error == "not run: resnet_tiny/main/one failed"
    three = execute_node(plan.nodes["resnet_tiny/main/three"], [two], parent_run_id=None, pipeline=cfg)
    assert three.status == BLOCKED and three.error == "not run: resnet_tiny/main/one failed"


def test_stage_error_becomes_a_failed_outcome(setup, monkeypatch):
    """An exception inside a stage must come back as a `failed` outcome with its one-line reason (the
    summary shows it), never as an exception that would take the other chains down."""
    cfg, plan, _ = setup

    def boom(_cfg, **_):
        raise RuntimeError("tracking server went away\nlong traceback")
    monkeypatch.setattr("orchestrator.engine.stage.run_stage", boom)
    outcome = execute_node(plan.nodes["ebn_tiny/main/one"], [], parent_run_id=None, pipeline=cfg)
    assert outcome.status == FAILED and outcome.error == "RuntimeError: tracking server went away"


def test_retrain_trains_a_finished_stage_again(setup, monkeypatch):
    """With --retrain (retrain=True) a stage whose config has a FINISHED run is trained again, and run_stage is
    told so (it then starts from epoch 0 under a Ray run name of its own)."""
    cfg, plan, uri = setup
    node = plan.nodes["resnet_tiny/main/one"]
    digest = config_hash(resolve_stage_config(node, {}, parent_run_id=None))
    _record(uri, cfg.tracking.experiment, digest, "FINISHED", {"val/top1_4bit": 91.5})
    calls = []

    def train(stage_cfg, *, retrain=False):
        calls.append(retrain)
        raise RuntimeError("trained")
    monkeypatch.setattr("orchestrator.engine.stage.run_stage", train)
    assert execute_node(node, [], parent_run_id=None, pipeline=cfg).status == SKIPPED
    outcome = execute_node(node, [], parent_run_id=None, pipeline=cfg, retrain=True)
    assert calls == [True] and outcome.status == FAILED and outcome.error == "RuntimeError: trained"


def _independent_nodes(plan):
    return [n for n in plan.nodes.values() if n.stage == "independent"]


def test_shared_train_run_trains_only_the_members_not_done(setup, monkeypatch):
    """Of the Independent networks that share a Train run, the one whose config already FINISHED is
    skipped; the others are trained together, in one call, and each gets its own outcome."""
    from orchestrator.engine.stage import StageResult
    from orchestrator.pipeline.runner import execute_nodes
    cfg, plan, uri = setup
    nodes = _independent_nodes(plan)
    upstream = [StageOutcome("resnet_tiny/main/one", FINISHED, "r1", "runs:/r1/model.pt")]
    by_key = {o.key: o for o in upstream}
    done = nodes[1]
    done_run = _record(uri, cfg.tracking.experiment, config_hash(resolve_stage_config(done, by_key, None)),
                       "FINISHED", {"val/top1_3bit": 80.0})
    calls = []

    def train_together(cfgs, *, retrain=False):
        calls.append([c.name for c in cfgs])
        return [StageResult(name=c.name, model_path="m", metrics={"epoch": 2}, mlflow_run_id=f"run-{c.name}",
                            checkpoint_dir="c", config_hash="h") for c in cfgs]
    monkeypatch.setattr("orchestrator.engine.stage.run_stages", train_together)
    outcomes = execute_nodes(nodes, upstream, parent_run_id=None, pipeline=cfg)
    assert calls == [[nodes[0].config.name, nodes[2].config.name]]
    assert [o.key for o in outcomes] == [n.key for n in nodes]
    assert [o.status for o in outcomes] == [FINISHED, SKIPPED, FINISHED]
    assert outcomes[1].run_id == done_run and outcomes[2].run_id == f"run-{nodes[2].config.name}"


def test_shared_train_run_failure_fails_each_member_with_one_traceback(setup, monkeypatch):
    """An error in a shared Train run fails every member it stopped, each with the one-line reason; the
    traceback is printed in the summary once, not once per member."""
    from orchestrator.pipeline.runner import execute_nodes
    cfg, plan, _ = setup

    def boom(cfgs, **_):
        raise RuntimeError("worker group died\nlong traceback")
    monkeypatch.setattr("orchestrator.engine.stage.run_stages", boom)
    upstream = [StageOutcome("resnet_tiny/main/one", FINISHED, "r1", "runs:/r1/model.pt")]
    outcomes = execute_nodes(_independent_nodes(plan), upstream, parent_run_id=None, pipeline=cfg)
    assert [o.status for o in outcomes] == [FAILED] * 3
    assert {o.error for o in outcomes} == {"RuntimeError: worker group died"}
    assert [bool(o.traceback) for o in outcomes] == [True, False, False]
    blocked = execute_nodes(_independent_nodes(plan), [outcomes[0]], parent_run_id=None, pipeline=cfg)
    assert {o.status for o in blocked} == {BLOCKED}

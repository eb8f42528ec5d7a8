"""Stages I -> II -> III of Bit-Mixer on the embedded digits, for real: a local Ray cluster, 2 Ray Train
workers, the DeepSpeed engine (ZeRO-1, gloo on CPU), the FFCV loaders, an `mlflow server` process.

One module-scoped run of the three stages (worker groups are the expensive part) feeds every test:
Stage II distils from Stage I through an MLflow model URI and trains side by side with a 2-bit Independent
network in one Train run, one of whose workers is killed after the first epoch; Stage III starts from
Stage II through an MLflow URI.
"""
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STAGE_EPOCHS = {"one": 3, "two": 2, "three": 2}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Data, MLflow server and Ray session shared by the module (one Ray session per module)."""
    tmp = tmp_path_factory.mktemp("stages")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bitmixer" / "torch_extensions"))
    import ray

    from orchestrator.data.embedded import write_embedded_digits
    from tests.servers import MLflowServer

    data = write_embedded_digits(tmp / "digits")
    with MLflowServer(tmp / "mlflow") as server:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
        try:
            yield {"tmp": tmp, "data": str(data), "mlflow": server}
        finally:
            ray.shutdown()


def stage_config(env, name, policy, epochs, lr_peak=5e-3, **extra):
    from orchestrator.engine import StageConfig
    return StageConfig.model_validate(dict(
        name=name,
        model=dict(name="resnet_tiny", num_classes=10, stem="small"),
        data=dict(path=env["data"], train_resolution=32, val_resolution=32, val_crop_ratio=1.0, batch_size=32,
                  num_workers=1),
        optim=dict(epochs=epochs, warmup_epochs=0.5, lr_peak=lr_peak),
        policy=policy,
        scaling=dict(num_workers=2, cpus_per_worker=0.5),
        tracking=dict(tracking_uri=env["mlflow"].uri, experiment="engine-test"),
        storage_path=str(env["tmp"] / "ray"),
        **extra,
    ))


@pytest.fixture(scope="module")
def stages(env):
    from orchestrator.engine import run_stage
    from orchestrator.engine.stage import run_stages
    from tests.engine.callbacks import CrashAfterEpoch, MlflowImported, SubnetFingerprints
    fingerprints = SubnetFingerprints()
    one = run_stage(stage_config(env, "digits-stage1", dict(stage="one"), STAGE_EPOCHS["one"]),
                    callbacks=[fingerprints, MlflowImported()])
    marker = env["tmp"] / "crashed-once"
    two, independent = run_stages([
        stage_config(env, "digits-stage2", dict(stage="two"), STAGE_EPOCHS["two"], init_from=one.model_path,
                     distill=dict(teacher="path", teacher_uri=f"runs:/{one.mlflow_run_id}/model.pt",
                                  temperature=2.0, weight=0.5)),
        stage_config(env, "digits-independent2", dict(stage="independent", fixed_bits=2), STAGE_EPOCHS["two"],
                     init_from=f"runs:/{one.mlflow_run_id}/model.pt")],
        callbacks=[fingerprints, CrashAfterEpoch(0, marker)])
    three = run_stage(stage_config(
        env, "digits-stage3", dict(stage="three", k=0.75, ramp_epochs=0), STAGE_EPOCHS["three"], lr_peak=2e-3,
        init_from=f"runs:/{two.mlflow_run_id}/model.pt"), callbacks=[fingerprints])
    return {"one": one, "two": two, "three": three, "independent": independent, "marker": marker}


def client(env):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=env["mlflow"].uri)


def test_learning_happened(stages):
    """Each stage ends far above the 10% of chance (a broken quantizer or a frozen optimizer stays near
    it on these digits): Stage I and II at 4 bits, Stage III at its best fixed bit-width, and the
    training loss falls from Stage I to Stage III. The figures cover the whole validation set once."""
    one, two, three = (stages[s].metrics for s in ("one", "two", "three"))
    print({s: {k: round(v, 1) for k, v in stages[s].metrics.items() if k.startswith(("val/top1", "val/rand_top1"))}
           for s in ("one", "two", "three")})
    assert three["val/images"] == 359  # the digits' validation split, counted once over both ranks
    assert one["val/top1_4bit"] > 30.0, one
    assert two["val/top1_4bit"] > 35.0, two
    assert max(three[f"val/top1_{b}bit"] for b in (2, 3, 4)) > 30.0, three
    assert three["train_loss"] < one["train_loss"] < 2.3


def test_stage_two_started_from_stage_one_weights(env, stages):
    """Stage II's run records the digest of the weights it loaded: it equals Stage I's model.pt (a stage
    that silently started from scratch, or from another checkpoint, would not match)."""
    import torch

    from orchestrator.engine.checkpoint import state_dict_digest
    from orchestrator.tracking.stage_run import TAG_INIT_DIGEST
    stage_one = torch.load(stages["one"].model_path, map_location="cpu", weights_only=True)
    assert stage_one["stage"] == "one" and stage_one["epoch"] == STAGE_EPOCHS["one"] - 1
    tags = client(env).get_run(stages["two"].mlflow_run_id).data.tags
    assert tags[TAG_INIT_DIGEST] == state_dict_digest(stage_one["state_dict"])
    stage_two = torch.load(stages["two"].model_path, map_location="cpu", weights_only=True)
    tags3 = client(env).get_run(stages["three"].mlflow_run_id).data.tags
    assert tags3[TAG_INIT_DIGEST] == state_dict_digest(stage_two["state_dict"])


def test_mlflow_holds_tables_checkpoints_and_tags(env, stages):
    """Each stage's run has the per-bit table (a row per bit-width + Rand.), model.pt, the resolved config,
    per-epoch metrics, its tags, and FINISHED status."""
    import mlflow

    from orchestrator.engine.checkpoint import load_model
    from orchestrator.tracking.stage_run import TAG_CONFIG_HASH, TAG_STAGE, TAG_STATUS
    c = client(env)
    mlflow.set_tracking_uri(env["mlflow"].uri)
    mlflow.set_experiment("engine-test")  # load_table searches the current experiment
    for stage in ("one", "two", "three"):
        result = stages[stage]
        run = c.get_run(result.mlflow_run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_STATUS] == "FINISHED"
        assert run.data.tags[TAG_STAGE] == stage
        assert run.data.tags[TAG_CONFIG_HASH] == result.config_hash
        assert run.data.tags["bitmixer.architecture"] == "resnet_tiny"
        assert run.data.params["optim.lr_peak"] == ("0.002" if stage == "three" else "0.005")
        names = {a.path for a in c.list_artifacts(result.mlflow_run_id)}
        assert {"model.pt", "config", "results"} <= names
        table = mlflow.load_table("results/per_bit.json", run_ids=[result.mlflow_run_id])
        assert list(table["bits"])[-1] == "Rand." and len(table) == 4
        assert table["top1"].iloc[2] == pytest.approx(result.metrics["val/top1_4bit"])
        history = c.get_metric_history(result.mlflow_run_id, "val/top1_4bit")
        assert sorted(m.step for m in history) == list(range(STAGE_EPOCHS[stage]))
    net = load_model(f"runs:/{stages['three'].mlflow_run_id}/model.pt", tracking_uri=env["mlflow"].uri)
    assert sum(p.numel() for p in net.parameters()) > 0


def test_only_the_rank_that_logs_imports_mlflow(stages):
    """Stage I reads nothing from MLflow, so rank 1 never needs mlflow: DeepSpeed's own import of it (for
    its autotuner) is kept out of the worker that does not log."""
    assert stages["one"].metrics["mlflow_imported"] == [True, False]


def test_ranks_drew_identical_subnets(stages):
    """Both ranks fingerprint their sequence of sub-net draws: the fingerprints are equal (the same
    sub-net trained on every rank at every step), and differ between stages."""
    digests = {stage: stages[stage].subnet_digests for stage in ("one", "two", "three")}
    for stage, pair in digests.items():
        assert len(pair) == 2 and pair[0] == pair[1], (stage, pair)
    assert len({pair[0] for pair in digests.values()}) == 3
    assert stages["three"].metrics["subnet_draws"] > 0


def test_killed_worker_resumes_from_last_checkpoint(env, stages):
    """A worker killed (os._exit) after the first epoch of the Train run that holds Stage II and the
    Independent network is replaced; both stages finish, resuming at epoch 1 from the one recorded
    checkpoint, each from its own part of it: no epoch is logged twice and epoch 0 is not trained again."""
    assert stages["marker"].exists()  # the crash did happen
    for stage in ("two", "independent"):
        final = stages[stage].metrics
        assert final["resumed_at_epoch"] == 1, stage
        assert final["epoch"] == STAGE_EPOCHS["two"] - 1
        history = client(env).get_metric_history(stages[stage].mlflow_run_id, "sys/epoch_time_s")
        assert sorted(m.step for m in history) == list(range(STAGE_EPOCHS["two"])), stage


def test_stages_side_by_side_keep_their_own_runs_and_models(env, stages):
    """The Independent network trained beside Stage II shares its Train run (one checkpoint folder, a
    subfolder each) but nothing else: its own FINISHED run, tagged independent, logging only its bit-width;
    started from Stage I's weights; its own model.pt, at 2 bits, unlike Stage II's."""
    import torch

    from orchestrator.engine.checkpoint import state_dict_digest
    from orchestrator.tracking.stage_run import TAG_INIT_DIGEST, TAG_STAGE
    two, independent = stages["two"], stages["independent"]
    assert Path(two.checkpoint_dir).parent == Path(independent.checkpoint_dir).parent
    assert Path(independent.checkpoint_dir).name == "digits-independent2"
    run = client(env).get_run(independent.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_STAGE] == "independent"
    assert "val/top1_2bit" in run.data.metrics and "val/top1_4bit" not in run.data.metrics
    assert independent.metrics["val/top1_2bit"] > 30.0, independent.metrics
    stage_one = torch.load(stages["one"].model_path, map_location="cpu", weights_only=True)
    assert run.data.tags[TAG_INIT_DIGEST] == state_dict_digest(stage_one["state_dict"])
    models = {name: torch.load(stages[name].model_path, map_location="cpu", weights_only=True)
              for name in ("two", "independent")}
    assert models["independent"]["stage"] == "independent" and models["two"]["stage"] == "two"
    assert state_dict_digest(models["independent"]["state_dict"]) != state_dict_digest(models["two"]["state_dict"])
    assert independent.subnet_digests and independent.subnet_digests[0] == independent.subnet_digests[1]


# One ASHA rung, at epoch 6 (23 / 6 < the reduction factor 4); the 17 epochs after it leave the trial, which
# reads its evaluations every few seconds, ample time to see its sixth before its stage could end.
SWEEP_EPOCHS, SWEEP_GRACE = 23, 6


@pytest.fixture(scope="module")
def asha_sweep(env, stages):
    """A real Tune sweep of Stage III (the project's run_sweep, ASHA on, one trial at a time) from the Stage II
    model. Its first trial is found FINISHED with perfect held-out scores (what a re-submitted sweep meets),
    so the rung's bar is 100%: the trial trained now is below it at its sixth evaluation, whatever its
    figures, and ASHA stops it there, long before its 23 epochs."""
    from orchestrator.engine.config import config_hash
    from orchestrator.pipeline.config import SweepSpec
    from orchestrator.pipeline.sweep import run_sweep, trial_config
    from orchestrator.tracking.stage_run import (TAG_CONFIG_HASH, TAG_STAGE, close_stage_run, open_stage_run,
                                                 publish_model)
    base = stage_config(env, "digits-sweep", dict(stage="three", k=0.75, ramp_epochs=0), SWEEP_EPOCHS,
                        init_from=f"runs:/{stages['two'].mlflow_run_id}/model.pt")
    base = base.model_copy(update={
        "optim": base.optim.model_copy(update={"warmup_epochs": 0, "max_steps_per_epoch": 2}),
        "tracking": base.tracking.model_copy(update={"experiment": "engine-sweep"})})
    spec = SweepSpec(k=[0.5, 0.75], ramp_epochs=[0], ramp_shape=["linear"], asha=True, grace_period=SWEEP_GRACE,
                     max_concurrent_trials=1)
    done = trial_config(base, 0.5, 0, "linear", parent_run_id="", holdout_fraction=spec.holdout_fraction)
    uri = base.tracking.tracking_uri
    bar = open_stage_run(tracking_uri=uri, experiment="engine-sweep", run_name="finished earlier", parent_run_id=None,
                         resolved_config={}, tags={TAG_CONFIG_HASH: config_hash(done), TAG_STAGE: "three"})
    client(env).log_batch(bar, metrics=[_metric(f"holdout/top1_{b}bit", 100.0) for b in (2, 3, 4)]
                          + [_metric("holdout/rand_top1_mean", 100.0)])
    publish_model(uri, bar, stages["two"].model_path)
    close_stage_run(uri, bar, succeeded=True)
    outcome = run_sweep(base, spec, trial_cpus=0.25, storage_path=str(env["tmp"] / "ray"), key="sweep",
                        parent_run_id=None)
    return {"outcome": outcome, "bar": bar}


def _metric(key, value):
    import time

    from mlflow.entities import Metric
    return Metric(key, value, int(time.time() * 1000), SWEEP_EPOCHS - 1)


def test_asha_stopped_trial_ends_killed(env, asha_sweep):
    """A trial ASHA stops early ends KILLED in MLflow, never RUNNING or FAILED, with fewer epochs logged than
    the sweep's max_t; no run of the sweep is left RUNNING, and the stopped trial is not counted as one that
    completed (the sweep's best is the trial found done)."""
    from orchestrator.tracking.stage_run import TAG_STATUS
    c = client(env)
    exp = c.get_experiment_by_name("engine-sweep")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    assert {r.info.status for r in runs} <= {"FINISHED", "KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    trials = [r for r in runs if r.data.tags.get("bitmixer.config_hash") and r.info.run_id != asha_sweep["bar"]]
    assert len(trials) == 1, [r.info.run_name for r in trials]
    (stopped,) = trials
    # KILLED, never FAILED: the stage of a stopped trial may close its own run FAILED while Tune tears the trial's
    # process down, and the sweep then marks what its scheduler stopped as stopped.
    assert stopped.info.status == "KILLED" and stopped.data.tags[TAG_STATUS] == "KILLED"
    epochs = {m.step for m in c.get_metric_history(stopped.info.run_id, "holdout/top1_4bit")}
    print("stopped trial evaluated at epochs", sorted(epochs))
    assert SWEEP_GRACE - 1 in epochs and max(epochs) < SWEEP_EPOCHS - 1, sorted(epochs)
    outcome = asha_sweep["outcome"]
    assert outcome.run_id == asha_sweep["bar"], outcome.detail
    assert "sweep of 1 trial(s) (1 found done)" in outcome.detail, outcome.detail

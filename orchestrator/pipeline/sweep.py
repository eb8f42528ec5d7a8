"""Ray Tune over Stage III: k and the sigma schedule (ramp length, ramp shape), every trial starting from the
same Stage II model.

Ray Train V2 refuses `Tuner(TorchTrainer)`; the supported form is a function trainable that builds and fits
the TorchTrainer itself, which `run_stage` does. The trial runs the stage in a thread and reports the
stage's evaluations to Tune as they appear in MLflow, so ASHA (optional) can stop a weak trial early.
Each trial is an MLflow run nested under the sweep's run; a trial whose exact config already FINISHED is
not trained again. The best trial is the architecture's final model and is registered in the MLflow
model registry.

The objective never reads the validation set the tables report: every trial holds a slice of the training
set out of training (`sweep.holdout_fraction`, every k-th image) and is scored on it (`holdout/...`).
"""
from __future__ import annotations

import statistics
import threading
import time

from orchestrator.engine.config import StageConfig, config_hash
from orchestrator.engine.evaluation import HOLDOUT_PREFIX
from orchestrator.pipeline.config import SweepSpec
from orchestrator.pipeline.outcome import FINISHED, SKIPPED, StageOutcome, finished_outcome, model_uri

TAG_SWEEP = "bitmixer.sweep_of"
TAG_BEST_TRIAL = "bitmixer.best_trial"
# A trial's last report says its stage ran to the end (or was found done). Not Tune's own "done": Tune sets
# that to True in the last result of a trial its scheduler stopped, and an ASHA-stopped trial (its run KILLED,
# no model.pt) would then be counted, and could be chosen, as a finished one.
COMPLETED = "stage_completed"
POLL_S = 2.0  # how often a trial reads its stage's new evaluations from MLflow and reports them to Tune


def objective(metrics: dict, bits: list[int], name: str, split: str = HOLDOUT_PREFIX) -> float | None:
    """The sweep's score of one evaluation on `split` (the held-out slice of the training set; "val/" only
    for a sweep without one); None when that evaluation is not in `metrics`."""
    per_bit = [metrics.get(f"{split}top1_{b}bit") for b in bits]
    rand = metrics.get(f"{split}rand_top1_mean")
    if name == "rand":
        return rand
    if name == "lowest_bit":
        return per_bit[bits.index(min(bits))]
    if rand is None or None in per_bit:
        return None
    return statistics.fmean([*per_bit, rand])  # mean_bits_and_rand: the paper's whole per-bit row


def trial_config(base: StageConfig, k: float, ramp_epochs: int, ramp_shape: str, parent_run_id: str,
                 repeat: int = 0, holdout_fraction: float = 0.0) -> StageConfig:
    """The Stage III config of one trial. Repeat r > 0 of a grid point is its own trial: its own seed (so
    its own config hash, MLflow run and Ray run name), named `...-r<r>`. The trial trains without the
    held-out slice (`holdout_fraction` of the training set) and is scored on it."""
    name = f"{base.name}-k{k:.3g}-ramp{ramp_epochs}-{ramp_shape}" + (f"-r{repeat}" if repeat else "")
    title = f"{base.tracking.run_name or base.name} k{k:.3g} ramp{ramp_epochs} {ramp_shape}" + (f" r{repeat}" if repeat else "")
    return base.model_copy(update={
        "name": name, "seed": base.seed + repeat,
        "policy": base.policy.model_copy(update={"k": k, "ramp_epochs": ramp_epochs, "ramp_shape": ramp_shape}),
        "data": base.data.model_copy(update={"holdout_fraction": holdout_fraction}),
        "tracking": base.tracking.model_copy(update={"parent_run_id": parent_run_id, "run_name": title}),
    })


def _running_run_id(cfg: StageConfig, digest: str) -> str | None:
    """The run that run_stage opened for this config (it tags it with the config hash)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.stage_run import TAG_CONFIG_HASH, TAG_STATUS
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"tags.`{TAG_CONFIG_HASH}` = '{digest}' and tags.`{TAG_STATUS}` = 'RUNNING'")
    return runs[0].info.run_id if runs else None


def _split(cfg: StageConfig) -> str:
    """Which figures score a trial: the held-out slice when the trial has one."""
    return HOLDOUT_PREFIX if cfg.data.holdout_fraction > 0 else "val/"


def _evaluations(cfg: StageConfig, run_id: str, bits: list[int], name: str) -> dict[int, float]:
    """epoch -> objective, for every evaluation the stage has logged so far."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    by_epoch: dict[int, dict] = {}
    split = _split(cfg)
    for key in [*(f"{split}top1_{b}bit" for b in bits), f"{split}rand_top1_mean"]:
        for m in client.get_metric_history(run_id, key):
            by_epoch.setdefault(m.step, {})[key] = m.value
    scores = {epoch: objective(values, bits, name, split) for epoch, values in by_epoch.items()}
    return {epoch: s for epoch, s in scores.items() if s is not None}


def _trial(config: dict) -> None:
    """The Tune function trainable: one Stage III run at (k, ramp_epochs, ramp_shape)."""
    from ray import tune

    from orchestrator.engine.stage import run_stage

    base = StageConfig.model_validate(config["stage"])
    cfg = trial_config(base, config["k"], config["ramp_epochs"], config["ramp_shape"], config["sweep_run_id"],
                       repeat=config.get("repeat", 0), holdout_fraction=config.get("holdout_fraction", 0.0))
    bits, name = list(cfg.model.bits_activations), config["objective"]
    digest = config_hash(cfg)
    done = None if config.get("retrain") else finished_outcome(cfg.name, cfg.tracking.tracking_uri,
                                                                cfg.tracking.experiment, digest)
    if done is not None:
        tune.report({"objective": objective(done.metrics, bits, name, _split(cfg)) or 0.0, "epoch": cfg.optim.epochs,
                     "run_id": done.run_id, "skipped": True, COMPLETED: True})
        return

    box: dict = {}

    def fit() -> None:
        try:
            box["result"] = run_stage(cfg, retrain=bool(config.get("retrain")))
        except BaseException as err:  # re-raised in the trial's own thread below
            box["error"] = err

    worker = threading.Thread(target=fit, name=f"stage-{cfg.name}", daemon=True)
    worker.start()
    reported, run_id = set(), None
    while worker.is_alive():
        worker.join(timeout=POLL_S)
        run_id = run_id or _running_run_id(cfg, digest)
        if run_id is None or not worker.is_alive():
            continue
        # Intermediate evaluations let ASHA compare trials at the same epoch.
        for epoch, score in sorted(_evaluations(cfg, run_id, bits, name).items()):
            if epoch not in reported and epoch < cfg.optim.epochs - 1:
                reported.add(epoch)
                tune.report({"objective": score, "epoch": epoch + 1, "run_id": run_id, "skipped": False,
                             COMPLETED: False})
    if "error" in box:
        raise box["error"]
    result = box["result"]
    tune.report({"objective": objective(result.metrics, bits, name, _split(cfg)) or 0.0, "epoch": cfg.optim.epochs,
                 "run_id": result.mlflow_run_id, "skipped": False, COMPLETED: True})


def _trials_that_fit(base: StageConfig, trial_cpus: float) -> int:
    """Trials hold their CPUs while their workers wait for theirs: never start more trials than the
    cluster can give workers to, or they all wait for each other."""
    import ray
    resources = ray.cluster_resources()
    need = trial_cpus + base.scaling.num_workers * base.scaling.cpus_per_worker
    fit = int(resources.get("CPU", 1) // need)
    if base.scaling.use_gpu:
        fit = min(fit, int(resources.get("GPU", 0) // base.scaling.num_workers))
    return max(1, fit)


def _sweep_run(base: StageConfig, parent_run_id: str | None, sweep_key: str) -> str:
    """The MLflow run the trials nest under; a re-submission reuses the earlier one of the same sweep."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.stage_run import code_version_tags, experiment_id
    client = MlflowClient(tracking_uri=base.tracking.tracking_uri)
    exp = experiment_id(base.tracking.tracking_uri, base.tracking.experiment)
    found = client.search_runs([exp], filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    from orchestrator.tracking.stage_run import TAG_ARCHITECTURE, TAG_STAGE
    tags = {TAG_SWEEP: sweep_key, TAG_STAGE: base.policy.stage, TAG_ARCHITECTURE: base.model.name, **code_version_tags()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp, tags=tags, run_name=f"{base.tracking.run_name or base.name} sweep")
    return run.info.run_id


def end_stopped_trials(tracking_uri: str, results) -> list[str]:
    """Mark the stage runs of trials the scheduler stopped (Tune results with no error whose stage did not
    complete) KILLED, also where the trial's stage closed its run FAILED while Tune tore the trial's process
    down: that run did not fail, it was stopped. A stage that finished (model.pt logged) just before its trial
    was stopped keeps FINISHED. Returns the runs marked."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.stage_run import STATUS_KILLED, close_stage_run
    client = MlflowClient(tracking_uri=tracking_uri)
    ended = []
    for result in results:
        run_id = (result.metrics or {}).get("run_id")
        if result.error is None and run_id and not result.metrics.get(COMPLETED) \
                and client.get_run(run_id).info.status != "FINISHED":
            close_stage_run(tracking_uri, run_id, succeeded=False, status=STATUS_KILLED)
            ended.append(run_id)
    return ended


def run_sweep(base: StageConfig, spec: SweepSpec, *, trial_cpus: float, storage_path: str, key: str,
              parent_run_id: str | None, retrain: bool = False) -> StageOutcome:
    """Run the Stage III sweep for one architecture; the outcome is the best trial's."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from orchestrator.tracking.stage_run import STATUS_KILLED, end_open_runs

    sweep_key = config_hash(base)  # the base's hash covers everything but the swept values
    sweep_run_id = _sweep_run(base, parent_run_id, sweep_key)
    param_space = {
        "k": tune.grid_search(spec.k), "ramp_epochs": tune.grid_search(spec.ramp_epochs),
        "ramp_shape": tune.grid_search(spec.ramp_shape),
        "repeat": tune.grid_search(list(range(spec.num_samples))),  # repeats are distinct trials (own seed)
        "stage": base.model_dump(mode="json"), "sweep_run_id": sweep_run_id, "objective": spec.objective,
        "retrain": retrain, "holdout_fraction": spec.holdout_fraction,
    }
    concurrent = spec.max_concurrent_trials or _trials_that_fit(base, trial_cpus)
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=base.optim.epochs, grace_period=spec.grace_period)
                 if spec.asha else None)
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": trial_cpus}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=1,
                                    scheduler=scheduler, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"{base.name}-sweep-{sweep_key[:12]}", storage_path=storage_path,
                                  verbose=0),
    )
    try:
        grid = tuner.fit()
    except BaseException:
        client = MlflowClient(tracking_uri=base.tracking.tracking_uri)
        end_open_runs(base.tracking.tracking_uri, sweep_run_id, STATUS_KILLED)
        client.set_terminated(sweep_run_id, status="FAILED")
        raise
    # Trials that ASHA stopped (or that died) leave their stage runs open: they end KILLED, never RUNNING.
    end_open_runs(base.tracking.tracking_uri, sweep_run_id, STATUS_KILLED)
    end_stopped_trials(base.tracking.tracking_uri, list(grid))
    client = MlflowClient(tracking_uri=base.tracking.tracking_uri)
    trials = []
    for result in grid:
        if result.error is None and result.metrics and result.metrics.get(COMPLETED):
            trials.append(result)
    errors = [str(r.error).splitlines()[0] for r in grid if r.error is not None]
    if not trials:
        raise RuntimeError(f"every trial of the Stage III sweep failed: {'; '.join(errors) or 'no result'}")
    best = max(trials, key=lambda r: r.metrics["objective"])
    run_id = best.metrics["run_id"]
    run = client.get_run(run_id)
    metrics = dict(run.data.metrics)
    client.log_metric(sweep_run_id, "best_objective", float(best.metrics["objective"]))
    for name in ("k", "ramp_epochs", "ramp_shape"):
        client.set_tag(sweep_run_id, f"best_{name}", str(best.config[name]))
    client.set_tag(sweep_run_id, "best_run_id", run_id)
    client.set_tag(run_id, TAG_BEST_TRIAL, "true")  # the trial that became the architecture's final model
    client.set_terminated(sweep_run_id, status="FINISHED")
    skipped = sum(bool(r.metrics.get("skipped")) for r in trials)
    detail = (f"sweep of {len(trials)} trial(s) ({skipped} found done), best k={best.config['k']:.3g} "
              f"ramp={best.config['ramp_epochs']} {best.config['ramp_shape']} "
              f"objective={best.metrics['objective']:.2f}" + (f"; failed: {'; '.join(errors)}" if errors else ""))
    status = SKIPPED if skipped == len(trials) and not errors else FINISHED
    return StageOutcome(key=key, status=status, run_id=run_id, model_uri=model_uri(run_id), metrics=metrics,
                        config_hash=config_hash(base), detail=detail)


def register_final_model(tracking_uri: str, name: str, run_id: str, *, architecture: str = "",
                         per_bit: dict[str, float] | None = None) -> str:
    """Register the run's model.pt as a version of `name` (once per run), with a description and its top-1
    per bit-width as tags (`top1_4bit`, ..., `rand`); returns the version."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name, description="Bit-Mixer meta-network (the final Stage III model): one "
                                                         "set of weights, every layer switchable to any bit-width.")
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.run_id == run_id:
            return version.version
    per_bit = per_bit or {}
    tags = {("rand" if key == "rand" else f"top1_{key}bit"): f"{value:.1f}" for key, value in per_bit.items()}
    if architecture:
        tags["architecture"] = architecture
    figures = ", ".join(f"{'Rand.' if k == 'rand' else k + ' bits'} {v:.1f}" for k, v in per_bit.items())
    description = (f"Bit-Mixer {architecture} meta-network, final Stage III model (run {run_id}). "
                   f"Validation top-1 (%): {figures or 'not recorded'}. Load model.pt with "
                   f"orchestrator.engine.checkpoint.load_model; switch bits with bitmixer_core.set_bits.")
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/model.pt"
    return client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                       description=description).version

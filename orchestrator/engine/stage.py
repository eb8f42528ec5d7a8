"""Driver side of one stage: check the tracking store, open the MLflow run, fit a Ray TorchTrainer (Train V2)
whose workers run `worker.train_loop_per_worker`, fetch the consolidated model.pt, close the run.

`run_stages` trains several stages side by side in one Train run (the same worker processes, one epoch of
each in turn): each keeps its own MLflow run, model.pt and results, and the run pays the start-up of Ray
Train's processes once instead of once per stage."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from orchestrator import atomic
from orchestrator.data.errors import DataError
from orchestrator.data.folder import check_data_folder
from orchestrator.engine.build_cache import torch_extensions_dir
from orchestrator.engine.callbacks import StageCallback
from orchestrator.engine.checkpoint import MODEL_FILE
from orchestrator.engine.config import StageConfig, check_side_by_side, config_hash
from orchestrator.engine.process_env import local_cpu_run, worker_environment
from orchestrator.tracking.reachability import check_tracking_reachable
from orchestrator.tracking.stage_run import (STATUS_FAILED, STATUS_KILLED, TAG_ARCHITECTURE, TAG_CONFIG_HASH,
                                             TAG_STAGE, close_stage_run, open_stage_run, publish_model)


@dataclass
class StageResult:
    """What a finished stage hands to the next one (and to the pipeline)."""

    name: str
    model_path: str  # consolidated model.pt on the driver's filesystem
    metrics: dict  # last reported metrics: val/top1_<b>bit, val/rand_top1_mean, train_loss, ...
    mlflow_run_id: str
    checkpoint_dir: str  # Ray's last checkpoint (local folder or s3://...)
    config_hash: str = ""
    subnet_digests: list = field(default_factory=list)  # per rank, when a callback reported "subnet_digests"


WORKER_GROUP_START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # ray.train.v2 constants


def _ensure_ray(cfg: StageConfig) -> None:
    """Start a local Ray when none is running, with the variables its workers need."""
    import ray
    if ray.is_initialized():
        return
    env = worker_environment(local_cpu=local_cpu_run(cfg.scaling.use_gpu))
    ray.init(runtime_env={"env_vars": env})


def stage_trainer_class():
    """Ray's TorchTrainer less its Ray Datasets helper: Ray Train starts a `DatasetManager` actor in every run
    (a process of its own, ~2 CPU-s to start on 2 cores) even when no Ray Dataset is passed, and a stage reads
    its data with FFCV, never through Ray Datasets. Every other callback of Ray's stays."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    class StageTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, DatasetsCallback)]

    return StageTrainer


def _fetch_model_pt(checkpoint, folder: str, destination: Path) -> Path:
    """Copy model.pt out of `folder` of Ray's checkpoint (local or S3; "" = the checkpoint's own folder) to
    `destination`, atomically."""
    source = "/".join(part for part in (checkpoint.path, folder, MODEL_FILE) if part)
    with checkpoint.filesystem.open_input_stream(source) as src:
        return atomic.copy_file(src, destination)


class StorageFull(OSError):
    """The checkpoint storage (or a worker's temporary folder) ran out of space."""


class StorageUnreachable(ConnectionError):
    """The remote checkpoint storage (S3, GCS) stopped answering."""


def _raise_clearly(cfg: StageConfig, error: BaseException, storage: str) -> None:
    """Re-raise a training error; a worker's DataError, a full disk or an unreachable storage (seen only as
    text once Ray has carried them across processes) becomes one sentence that says what to do."""
    if "No space left on device" in str(error) or "[Errno 28]" in str(error):
        raise StorageFull(f"stage {cfg.name} stopped: a disk ran out of space (No space left on device) while an "
                          f"epoch's checkpoint was written to {storage} or a worker's temporary folder; free "
                          f"space or set storage_path to a larger volume, then run again: the stage resumes "
                          f"from its last recorded checkpoint, which is intact.") from error
    unreadable = re.findall(r"DataError: (.+)", str(error))  # a worker's loader: its last line is the sentence
    if unreadable:
        raise DataError(f"stage {cfg.name} stopped: {unreadable[-1].strip()}") from error
    remote = re.search(r"AWS Error [A-Z_]+|GCS Error [A-Za-z_]+", str(error))
    if "://" in storage and remote:
        raise StorageUnreachable(f"stage {cfg.name} stopped: its checkpoint storage {storage} did not answer "
                                 f"({remote.group(0)}); make sure it is reachable from every node, then run "
                                 f"again: the stage resumes from its last checkpoint recorded there.") from error
    raise error


def run_stage(cfg: StageConfig, *, retrain: bool = False, callbacks: Sequence[StageCallback] = ()) -> StageResult:
    """Train one stage to its end, resuming from Ray's last checkpoint of the same config (after a worker
    failure, or a re-run after the driver was stopped); `retrain` starts from epoch 0 under a Ray run
    name of its own instead. `callbacks` run on every worker after each epoch (tests: fault injection,
    fingerprints)."""
    return run_stages([cfg], retrain=retrain, callbacks=callbacks)[0]


def train_run_name(cfgs: Sequence[StageConfig], digests: Sequence[str], *, retrain_id: str | None) -> str:
    """Ray's name for the Train run: its stage(s) and a hash of their configs, so that a re-run of the same
    stages resumes its own checkpoints, never another's; with `retrain_id`, a name of its own."""
    if len(cfgs) == 1:
        name, digest = cfgs[0].name, digests[0]
    else:
        names = [cfg.name for cfg in cfgs]
        common = os.path.commonprefix(names).rstrip("-_")
        name = f"{common}-x{len(cfgs)}" if common else "+".join(names)
        digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    return f"{name}-{digest[:12]}" + (f"-retrain-{retrain_id[:8]}" if retrain_id else "")


def run_stages(cfgs: Sequence[StageConfig], *, retrain: bool = False,
               callbacks: Sequence[StageCallback] = ()) -> list[StageResult]:
    """Train stages side by side in one Train run (see the module's docstring), each to its end; the
    results in the order of `cfgs`. A failure fails them all: each run ends FAILED (KILLED when stopped)."""
    check_side_by_side(cfgs)
    cfg = cfgs[0]
    check_tracking_reachable(cfg.tracking)  # one sentence now rather than a failure an hour later
    check_data_folder(cfg.data.path, num_classes=cfg.model.num_classes)  # likewise, before any run or worker
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from orchestrator.engine.worker import train_loop_per_worker

    digests = [config_hash(member) for member in cfgs]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    resolved = [member.model_dump(mode="json") for member in cfgs]
    run_ids: list[str] = []
    closed: set[str] = set()
    try:
        for member, config, digest in zip(cfgs, resolved, digests):
            run_ids.append(open_stage_run(
                tracking_uri=member.tracking.tracking_uri, experiment=member.tracking.experiment,
                run_name=member.tracking.run_name or member.name, parent_run_id=member.tracking.parent_run_id,
                resolved_config=config,
                tags={TAG_STAGE: member.policy.stage, TAG_ARCHITECTURE: member.model.name, TAG_CONFIG_HASH: digest}))
        _ensure_ray(cfg)
        # Read by the Train controller when the worker group starts; the driver's value is passed on to it.
        os.environ[WORKER_GROUP_START_TIMEOUT_VARIABLE] = str(cfg.scaling.start_timeout_s)
        storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
        ray_run_name = train_run_name(cfgs, digests, retrain_id=run_ids[0] if retrain else None)
        trainer = stage_trainer_class()(
            train_loop_per_worker,
            train_loop_config={"stages": resolved, "run_ids": run_ids, "name": ray_run_name,
                               "torch_extensions_dir": torch_extensions_dir(),
                               # callbacks may watch Ray's record of checkpoints (local runs)
                               "run_dir": None if "://" in storage else str(Path(storage) / ray_run_name),
                               "callbacks": list(callbacks)},
            scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=RunConfig(
                name=ray_run_name, storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        try:
            result = trainer.fit()
            error = result.error
        except Exception as err:  # Ray Train V2 raises what the workers raised, wrapped
            error = err
        if error is not None:
            _raise_clearly(cfg if len(cfgs) == 1 else cfg.model_copy(update={"name": ray_run_name}), error, storage)
        checkpoint = result.checkpoint
        # Beside Ray's checkpoints when they are local; under ./runs when they live in S3.
        local_dir = Path(storage) / ray_run_name if "://" not in storage else Path.cwd() / "runs" / ray_run_name
        checkpoint_dir = (f"{storage.split('://')[0]}://{checkpoint.path}" if "://" in storage
                          else str(checkpoint.path))
        reported = dict(result.metrics)
        results = []
        for member, run_id, digest in zip(cfgs, run_ids, digests):
            # A single stage's files are the checkpoint folder itself; a member's, its subfolder.
            folder = "" if len(cfgs) == 1 else member.name
            model_path = _fetch_model_pt(checkpoint, folder, local_dir / folder / MODEL_FILE)
            # A stage resumed at its last epoch trained nothing: its model.pt comes from the checkpoint.
            publish_model(member.tracking.tracking_uri, run_id, model_path)
            metrics = dict(reported if len(cfgs) == 1 else reported["members"][member.name])
            digests_of_ranks = metrics.pop("subnet_digests", [])
            results.append(StageResult(
                name=member.name, model_path=str(model_path), metrics=metrics, mlflow_run_id=run_id,
                checkpoint_dir=checkpoint_dir + (f"/{folder}" if folder else ""), config_hash=digest,
                subnet_digests=digests_of_ranks))
        for member, run_id in zip(cfgs, run_ids):
            close_stage_run(member.tracking.tracking_uri, run_id, succeeded=True)  # FINISHED only with model.pt
            closed.add(run_id)
    except BaseException as error:
        # Ctrl-C, SIGTERM (SystemExit) and a cancelled Ray task end the run KILLED; anything else FAILED.
        stopped = isinstance(error, (KeyboardInterrupt, SystemExit)) or type(error).__name__ == "TaskCancelledError"
        for member, run_id in zip(cfgs, run_ids):
            if run_id in closed:  # FINISHED with its model already
                continue
            try:
                close_stage_run(member.tracking.tracking_uri, run_id, succeeded=False,
                                status=STATUS_KILLED if stopped else STATUS_FAILED)
            except Exception as err:  # never hide the stage's own error behind a tracking one
                print(f"[{member.name}] could not mark MLflow run {run_id} {'KILLED' if stopped else 'FAILED'}: "
                      f"{err}", flush=True)
        raise
    return results

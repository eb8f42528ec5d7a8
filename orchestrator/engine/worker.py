"""The training loop of one Ray Train worker (one data-parallel rank) for one stage, or for several stages
trained side by side in the same worker processes (one epoch of each in turn).

It differs from single-process training only by a few distributed calls: Ray has already made the process
group; DeepSpeed wraps the model; the loaders shard the data; evaluation all-reduces its counts; every rank
reports its DeepSpeed shard with the epoch's checkpoint and Ray merges them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator import atomic
from orchestrator.engine.config import StageConfig

CHECKPOINT_TAG = "deepspeed"  # one tag per reported checkpoint folder (Ray keeps one folder per epoch)
STATE_FILE = "engine_state.pt"


@contextlib.contextmanager
def _mlflow_not_importable():
    """Inside the block `import mlflow` raises ImportError, unless mlflow is already imported.

    DeepSpeed imports mlflow when it is itself imported (deepspeed.autotuning.autotuner, inside a `try`, for
    its autotuner, which a stage never runs): 1 of the 1.3 CPU-seconds of `import deepspeed` on the 2-core
    machine. Only the rank that logs needs mlflow (RunLogger has imported it there already); the others
    import DeepSpeed without it. Afterwards mlflow imports again as usual (a teacher read from MLflow)."""
    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # the import system's mark for "not importable"
    try:
        yield
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # DeepSpeed places the engine on the current CUDA device
        return device
    return torch.device("cpu")


@torch.no_grad()
def _broadcast_from_rank0(net) -> None:
    """Make every rank hold rank 0's parameters and buffers (calibration saw a different batch per rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in list(net.parameters()) + list(net.buffers()):
            dist.broadcast(tensor.data, src=0)


def _first_images(train_loader, epoch: int) -> torch.Tensor:
    """One training batch for activation calibration; the loader is put back on `epoch` afterwards (FFCV
    advances its epoch counter whenever an iteration starts)."""
    batches = iter(train_loader)
    images = next(batches)[0].clone()
    batches.close()
    train_loader.set_epoch(epoch)
    return images


def _load_teacher(cfg: StageConfig, device: torch.device):
    """Frozen teacher of the same architecture: eval mode, no gradients, at its own stage's precision."""
    if cfg.distill.teacher == "none":
        return None
    import bitmixer_core as core
    from orchestrator.engine.checkpoint import model_from_payload, read_model_pt
    from orchestrator.engine.subnets import set_stage_precision
    from orchestrator.tracking.credentials import redact_uri
    payload = read_model_pt(cfg.distill.teacher_uri, cfg.tracking.tracking_uri)
    if payload.get("model_name") != cfg.model.name:
        raise ValueError(f"the teacher {redact_uri(cfg.distill.teacher_uri)!r} is a {payload.get('model_name')!r}, "
                         f"not a {cfg.model.name!r}; distillation needs a teacher of the same architecture.")
    teacher = model_from_payload(payload)
    set_stage_precision(teacher, payload.get("stage", "fp32"))
    core.set_bits(teacher, max(cfg.model.bits_activations))
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _record_epoch(cfg: StageConfig, logger, net, folder: Path, metrics: dict, table: dict | None, *,
                  last: bool) -> None:
    """Rank 0: the consolidated model.pt beside the DeepSpeed shards, MLflow metrics (grouped names, step =
    epoch; an Independent network only at its own bit-width) and tables (model.pt as an artifact at the end),
    and one progress line."""
    from orchestrator.engine.checkpoint import MODEL_FILE, save_model_pt
    from orchestrator.engine.evaluation import own_bit_rows, tracked_metrics
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    model_pt = save_model_pt(folder / MODEL_FILE, net=net, model_name=cfg.model.name,
                             build_kwargs=cfg.model.build_kwargs(), stage=cfg.policy.stage,
                             epoch=metrics["epoch"], metrics=scalars)
    fixed_bits = cfg.policy.fixed_bits if cfg.policy.stage == "independent" else None
    logger.metrics(tracked_metrics(scalars, fixed_bits=fixed_bits), step=metrics["epoch"])
    if table is not None and fixed_bits is not None:
        table = own_bit_rows(table, fixed_bits)
    if table is not None:
        logger.table(table, f"results/per_bit_epoch{metrics['epoch']:03d}.json")
    if last:
        logger.table(table, "results/per_bit.json")
        logger.artifact(model_pt)
    print(progress_line(cfg, metrics), flush=True)


def progress_line(cfg: StageConfig, metrics: dict) -> str:
    """One line per epoch: loss, lr, top-1 at every bit-width and Rand. when evaluated, time."""
    from orchestrator.engine.evaluation import RAND_TOP1, TOP1_FP32, top1_key
    text = (f"[{cfg.name}] epoch {metrics['epoch'] + 1}/{cfg.optim.epochs} loss {metrics['train_loss']:.4f} "
            f"lr {metrics['lr']:.2e}")
    if TOP1_FP32 in metrics:
        text += f" top1 fp32 {metrics[TOP1_FP32]:.1f}%"
    elif cfg.policy.stage == "independent" and top1_key(cfg.policy.fixed_bits) in metrics:
        text += f" top1 {cfg.policy.fixed_bits}b {metrics[top1_key(cfg.policy.fixed_bits)]:.1f}%"
    elif RAND_TOP1 in metrics:
        text += (" top1 " + "/".join(f"{b}b {metrics[top1_key(b)]:.1f}" for b in cfg.model.bits_activations)
                 + f" rand {metrics[RAND_TOP1]:.1f}%")
    return text + f" time {metrics['epoch_time_s']:.1f}s"


class StageWorker:
    """One rank of one stage, in named steps: prepare the model, build the engine (with its loaders), then
    per epoch train, evaluate, checkpoint and report. Callbacks (tests) see the worker after each epoch."""

    def __init__(self, cfg: StageConfig, *, run_id: str | None, run_dir: str | None = None, callbacks=(),
                 rank: int | None = None, world_size: int | None = None, member: str = "",
                 resume_from: Path | None = None):
        """Inside Ray Train, rank and world size come from its context, and the checkpoint to resume from is
        chosen here. Given explicitly, either a stage beside others in one Train run (`member` = its
        subfolder in the run's checkpoints, `resume_from` = that subfolder of the checkpoint the run
        resumes from, chosen once for all of them), or a process group made by the caller, no Ray: the
        worker runs its steps up to evaluation (the presets' smoke test)."""
        from orchestrator.tracking.stage_run import RunLogger
        self.cfg, self.run_dir, self.callbacks, self.member = cfg, run_dir, list(callbacks), member
        self._resume_copy = contextlib.ExitStack()  # this rank's local copy of the checkpoint it resumes from
        if rank is None:
            self.rank, self.world_size = _ray_rank()
        else:
            self.rank, self.world_size = rank, world_size or 1
        self.device = _device(cfg.scaling.use_gpu)
        # The local folder of the newest whole checkpoint Ray recorded for this run, or None (epoch 0).
        self.resume = self._choose_checkpoint() if rank is None else resume_from
        self.logger = RunLogger(cfg.tracking.tracking_uri, run_id) if self.rank == 0 and run_id else None
        self.stage, self.bits = cfg.policy.stage, list(cfg.model.bits_activations)
        self.start_epoch, self.resumed_from, self.global_step = 0, -1, 0

    def _choose_checkpoint(self) -> Path | None:
        """Ray's recorded checkpoints of this run, newest first, checked against their manifests on every
        rank (orchestrator.engine.resume); the copy stays until build_engine has loaded it."""
        from orchestrator.engine.resume import newest_whole_checkpoint
        return self._resume_copy.enter_context(_newest_whole_checkpoint(self.cfg.name, self.rank))

    def prepare_model(self):
        """The stage's network on this rank's device: built with the run seed (the same on every rank), at
        its stage's precision, from the previous stage's weights unless Ray resumes this stage."""
        import bitmixer_core as core
        from orchestrator.engine.checkpoint import load_weights, state_dict_digest
        from orchestrator.engine.subnets import set_stage_precision
        from orchestrator.tracking.stage_run import TAG_INIT_DIGEST
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        net = cfg.model.build()
        set_stage_precision(net, self.stage)
        if cfg.init_from and self.resume is None:
            payload = load_weights(net, cfg.init_from, expect_model=cfg.model.name, bn=cfg.model.bn,
                                   tracking_uri=cfg.tracking.tracking_uri)
            if self.logger:  # which weights this stage started from, before anything changes them
                self.logger.tag(TAG_INIT_DIGEST, state_dict_digest(net.state_dict()))
            # What the core's Stage does when it starts from the previous one (step sizes, mixed BN entries).
            if payload.get("stage") in core.STAGES:
                core.get_stage(self.stage).start_from(net, core.get_stage(payload["stage"]))
        return net.to(self.device)

    def build_engine(self, net, loaders=None) -> None:
        """Loaders (this rank's shard; `loaders` = (train, val) reuses built ones), activation calibration,
        the DeepSpeed engine with its schedule, the teacher and the sub-net sampler; then the resumed
        checkpoint, if any."""
        with _mlflow_not_importable():
            import deepspeed

        import bitmixer_core as core
        from orchestrator.data.loaders import build_loaders
        from orchestrator.engine.deepspeed_config import deepspeed_config, parameter_groups
        from orchestrator.engine.precision import compute_dtype
        from orchestrator.engine.schedule import warmup_cosine
        from orchestrator.engine.subnets import SubnetSampler
        cfg = self.cfg
        self.train_loader, self.val_loader = loaders or build_loaders(
            cfg.data, rank=self.rank, world_size=self.world_size, device=self.device, distributed=self.world_size > 1)
        self.holdout_loader = None
        if cfg.data.holdout_fraction > 0:  # a Stage III sweep trial: its objective reads this slice
            from orchestrator.data.loaders import build_val_loader
            self.holdout_loader = build_val_loader(cfg.data, rank=self.rank, world_size=self.world_size,
                                                   device=self.device, holdout=True)
        self.steps_per_epoch = min(len(self.train_loader), cfg.optim.max_steps_per_epoch or len(self.train_loader))
        total_steps = self.steps_per_epoch * cfg.optim.epochs
        warmup_steps = int(round(cfg.optim.warmup_epochs * self.steps_per_epoch))
        if self.resume is None and core.get_stage(self.stage).needs_calibration(net):
            core.calibrate_activation_step_sizes(net, _first_images(self.train_loader, 0))
        _broadcast_from_rank0(net)
        if cfg.deepspeed.compile_blocks:  # the opt-in compiled training path (after calibration, which stays eager)
            core.compile_fused_regions(net)

        ds_config = deepspeed_config(cfg, world_size=self.world_size, use_gpu=cfg.scaling.use_gpu)
        self.engine, _, _, _ = deepspeed.initialize(
            model=net, model_parameters=parameter_groups(net), config=ds_config,
            lr_scheduler=lambda opt: warmup_cosine(opt, total_steps=total_steps, warmup_steps=warmup_steps,
                                                   lr_peak=cfg.optim.lr_peak, lr_final=cfg.optim.lr_final),
            dist_init_required=False)
        self.dtype = compute_dtype(ds_config)  # the engine's forward; the teacher and evaluation follow it
        self.teacher = _load_teacher(cfg, self.device)
        self.sampler = SubnetSampler(self.engine.module, cfg.policy, cfg.model, cfg.seed)
        if self.resume is not None:
            with self._resume_copy:  # the local copy goes once loaded
                _, client_state = self.engine.load_checkpoint(str(self.resume), tag=CHECKPOINT_TAG)
            self.start_epoch = self.resumed_from = int(client_state["epoch"]) + 1
        self.global_step = self.start_epoch * self.steps_per_epoch

    def train_epoch(self, epoch: int) -> dict:
        """One pass over this rank's shard, one sub-net per optimizer step (the same on every rank)."""
        from orchestrator.engine.step import train_step
        started = time.perf_counter()
        self.train_loader.set_epoch(epoch)
        self.engine.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for i, (images, labels) in enumerate(self.train_loader):
            if i == self.steps_per_epoch:  # max_steps_per_epoch
                break
            step_loss, step_images = train_step(
                self.engine, images, labels, sampler=self.sampler, global_step=self.global_step,
                epoch=epoch + i / self.steps_per_epoch, accumulation=self.cfg.deepspeed.grad_accumulation,
                distill=self.cfg.distill, teacher=self.teacher, dtype=self.dtype)
            loss_sum += torch.tensor([step_loss, step_images], dtype=torch.float64)
            self.global_step += 1
        if dist.is_initialized():
            dist.all_reduce(loss_sum)  # the mean training loss over every rank's images
        return {"epoch": epoch, "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                "lr": self.engine.get_lr()[0], "epoch_time_s": time.perf_counter() - started,
                "global_step": self.global_step, "resumed_at_epoch": self.resumed_from,
                "subnet_draws": self.sampler.draws}

    def evaluate(self, epoch: int, metrics: dict) -> dict | None:
        """Every eval_every_epochs and at the end: top-1 per bit-width and Rand. into `metrics`; the table."""
        from orchestrator.engine.evaluation import evaluate_stage, per_bit_table
        cfg = self.cfg
        if not (epoch == cfg.optim.epochs - 1 or (epoch + 1) % cfg.eval_every_epochs == 0):
            return None
        metrics.update(evaluate_stage(self.engine.module, self.val_loader, stage=self.stage, bits=self.bits,
                                      rand_seeds=cfg.rand_seeds, device=self.device, dtype=self.dtype))
        if self.holdout_loader is not None:
            from orchestrator.engine.evaluation import as_holdout
            metrics.update(as_holdout(evaluate_stage(
                self.engine.module, self.holdout_loader, stage=self.stage, bits=self.bits,
                rand_seeds=cfg.rand_seeds, device=self.device, dtype=self.dtype)))
        return per_bit_table(metrics, bits=self.bits, stage=self.stage, first_last=cfg.model.first_last,
                             bits_weights=list(cfg.model.bits_weights))

    def train_and_evaluate(self, epoch: int) -> tuple[dict, dict | None]:
        """One epoch: train, evaluate when due, then the callbacks see the epoch's metrics."""
        metrics = self.train_epoch(epoch)
        table = self.evaluate(epoch, metrics)
        for callback in self.callbacks:
            callback.on_epoch_end(self, epoch, metrics)
        return metrics, table

    def save_epoch(self, run_folder: Path, epoch: int, metrics: dict, table: dict | None) -> None:
        """This rank's DeepSpeed shard into the stage's folder of the epoch's checkpoint; rank 0 adds model.pt
        and logs to MLflow."""
        folder = run_folder / self.member
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={"epoch": epoch},
                                    save_latest=True)
        if self.rank == 0:
            _record_epoch(self.cfg, self.logger, self.engine.module, folder, metrics, table,
                          last=epoch == self.cfg.optim.epochs - 1)

    def run(self) -> None:
        train_side_by_side([self], self.cfg.name)


def train_side_by_side(members: list[StageWorker], name: str) -> None:
    """The epochs of one Train run: each epoch every member stage trains and evaluates in turn (the first
    one's loaders serve them all, so each sees the batches it would see alone); then every rank writes one
    checkpoint folder holding each member's shard in the member's subfolder and its manifest as the last
    file, and Ray merges the ranks' folders into the epoch's checkpoint. A single stage is a run of one
    member whose subfolder is the folder itself, reported with its own metrics."""
    import ray.train
    from ray.train import Checkpoint

    from orchestrator.engine.resume import write_manifest
    first = members[0]
    for member in members:
        member.build_engine(member.prepare_model(),
                            loaders=None if member is first else (first.train_loader, first.val_loader))
    if len({member.start_epoch for member in members}) != 1:
        raise RuntimeError(f"the stages of Train run {name} would resume at different epochs; they share "
                           f"one checkpoint per epoch, so this checkpoint is not theirs: train them again")
    for epoch in range(first.start_epoch, first.cfg.optim.epochs):
        results = [member.train_and_evaluate(epoch) for member in members]
        with atomic.scratch_folder(f"{name}-e{epoch}") as folder:
            for member, (metrics, table) in zip(members, results):
                member.save_epoch(folder, epoch, metrics, table)
            write_manifest(folder, rank=first.rank, world_size=first.world_size)  # this rank's last file there
            report = results[0][0] if len(members) == 1 else {
                "epoch": epoch, "members": {member.member: metrics for member, (metrics, _) in zip(members, results)}}
            ray.train.report(report, checkpoint=Checkpoint.from_directory(str(folder)))
        for member in members:
            for callback in member.callbacks:
                callback.after_report(member, epoch)


def _ray_rank() -> tuple[int, int]:
    """This worker's rank and the world size of its Train run."""
    import ray.train
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


def _from_every_rank(value) -> list:
    """`value` of every rank, in rank order (an all-gather)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _newest_whole_checkpoint(name: str, rank: int):
    """Ray's recorded checkpoints of this run, newest first, checked against their manifests on every rank
    (orchestrator.engine.resume): a context holding this rank's local copy of the one to resume from."""
    from orchestrator.engine.resume import newest_whole_checkpoint
    return newest_whole_checkpoint(_recorded_checkpoints(), gather=_from_every_rank, stage=name,
                                   log=lambda line: print(line, flush=True) if rank == 0 else None)


def train_members_in_ray(cfgs: list[StageConfig], run_ids: list[str], *, name: str, run_dir: str | None,
                         callbacks=()) -> None:
    """Several stages side by side in this Train run's worker: the checkpoint to resume from is chosen once,
    and each member reads its own subfolder of it (named after the member's stage)."""
    rank, world_size = _ray_rank()
    with contextlib.ExitStack() as copy:
        resume = copy.enter_context(_newest_whole_checkpoint(name, rank))
        members = [StageWorker(cfg, run_id=run_id, run_dir=run_dir, callbacks=callbacks, rank=rank,
                               world_size=world_size, member=cfg.name,
                               resume_from=None if resume is None else resume / cfg.name)
                   for cfg, run_id in zip(cfgs, run_ids)]
        # The members load their parts in order: the copy goes once the last one has loaded its own.
        members[-1]._resume_copy.enter_context(copy.pop_all())
    train_side_by_side(members, name)


def _recorded_checkpoints():
    """Ray's recorded checkpoints of this run, newest first: the latest, then (only if it is asked for) the
    ones Ray kept before it."""
    import ray.train
    latest = ray.train.get_checkpoint()
    if latest is None:
        return
    yield latest
    from ray.train import CheckpointConsistencyMode
    reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                                        timeout_s=120)
    older = [r for r in reported if r.checkpoint.path != latest.path]
    for r in sorted(older, key=lambda r: r.metrics.get("epoch", -1), reverse=True):
        yield r.checkpoint


STALE_BUILD_LOCK_S = 600.0  # DeepSpeed's shm-comm op builds in under a minute on 2 cores


def clear_stale_build_locks(extensions_dir: str | os.PathLike, older_than_s: float = STALE_BUILD_LOCK_S) -> list[Path]:
    """Remove the `lock` file a build killed half-way (a stopped stage, a SIGKILL'd driver) left in the torch
    extensions cache: torch waits for it to go away, forever, before it loads the op. A lock older than any
    real build is stale."""
    removed = []
    for lock in Path(extensions_dir).glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > older_than_s:
                lock.unlink(missing_ok=True)
                removed.append(lock)
                print(f"removed the stale build lock {lock} (left by a build that was stopped)", flush=True)
        except OSError:
            continue
    return removed


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point Ray Train runs on every worker; `loop_config` = {"stages": [StageConfig JSON, ...],
    "run_ids": [...], "name" (the Train run's), "torch_extensions_dir", "run_dir", "callbacks"}."""
    cfgs = [StageConfig.model_validate(stage) for stage in loop_config["stages"]]
    cfg = cfgs[0]  # every member runs on the same workers and data (engine.stage checks it)
    # Before DeepSpeed is imported: its CPU accelerator, and a stable cache for the shm-comm build.
    if not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", loop_config["torch_extensions_dir"])
    from orchestrator.engine.build_cache import use_environment_build_tools
    use_environment_build_tools()  # the environment's ninja, as in every other process: no rebuild
    clear_stale_build_locks(os.environ["TORCH_EXTENSIONS_DIR"])
    atomic.remove_stale(tempfile.gettempdir(), prefix="bitmixer-")  # scratch folders of killed workers
    from orchestrator.data.compile_cache import enable_compile_cache
    enable_compile_cache()  # the loaders' numba code compiled once per machine, not once per worker
    callbacks = loop_config.get("callbacks") or ()
    if len(cfgs) == 1:
        StageWorker(cfg, run_id=loop_config["run_ids"][0], run_dir=loop_config.get("run_dir"),
                    callbacks=callbacks).run()
    else:
        train_members_in_ray(cfgs, loop_config["run_ids"], name=loop_config["name"],
                             run_dir=loop_config.get("run_dir"), callbacks=callbacks)

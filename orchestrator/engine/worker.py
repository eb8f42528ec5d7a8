"""The training loop of one Ray Train worker (one data-parallel rank) for one stage.

It differs from single-process training only by a few distributed calls: Ray has already made the process
group; DeepSpeed wraps the model; the loaders shard the data; evaluation all-reduces its counts; every rank
reports its DeepSpeed shard with the epoch's checkpoint and Ray merges them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.engine.config import StageConfig

CHECKPOINT_TAG = "deepspeed"  # one tag per reported checkpoint folder (Ray keeps one folder per epoch)
STATE_FILE = "engine_state.pt"


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)  # DeepSpeed places the engine on the current CUDA device
        return device
    return torch.device("cpu")


def _quantization_initialised(net) -> bool:
    import bitmixer_core as core
    layers = [m for m in net.modules() if isinstance(m, core.QuantizedLayerMixin)]
    return all(bool(m.activation_step_initialized.all()) for m in layers)


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
    payload = read_model_pt(cfg.distill.teacher_uri, cfg.tracking.tracking_uri)
    if payload.get("model_name") != cfg.model.name:
        raise ValueError(f"the teacher {cfg.distill.teacher_uri!r} is a {payload.get('model_name')!r}, not a "
                         f"{cfg.model.name!r}; distillation needs a teacher of the same architecture.")
    teacher = model_from_payload(payload)
    set_stage_precision(teacher, payload.get("stage", "fp32"))
    core.set_bits(teacher, max(cfg.model.bits_activations))
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _crash_if_asked(cfg: StageConfig, epoch: int, rank: int, world_size: int, run_dir: str | None) -> None:
    """Fault injection for the fault-tolerance test: one rank exits hard after `crash_after_epoch`, once.

    It first waits (at most 2 minutes) until Ray has recorded that epoch's checkpoint in the run's
    checkpoint_manager_snapshot.json: Ray collects reports every ~2 s, and a loaded machine is slower, so
    an immediate crash could lose the checkpoint and make the test's outcome a matter of timing."""
    debug = cfg.debug
    if debug.crash_after_epoch is None or debug.crash_after_epoch != epoch:
        return
    if rank != (1 if world_size > 1 else 0) or not debug.crash_marker:
        return
    marker = Path(debug.crash_marker)
    if marker.exists():
        return
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json" if run_dir else None
    deadline = time.monotonic() + 120.0
    while snapshot is not None and time.monotonic() < deadline and not _recorded(snapshot, epoch):
        time.sleep(0.5)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"crashed after epoch {epoch}\n")
    os._exit(1)


def _recorded(snapshot: Path, epoch: int) -> bool:
    import json
    try:
        results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return False
    return any(r.get("metrics", {}).get("epoch") == epoch for r in results)


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


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point Ray Train runs on every worker; `loop_config` = {"stage": StageConfig JSON, "run_id": ...}."""
    cfg = StageConfig.model_validate(loop_config["stage"])
    use_gpu = cfg.scaling.use_gpu
    # Before DeepSpeed is imported: its CPU accelerator, and a stable cache for the shm-comm build.
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", loop_config["torch_extensions_dir"])

    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    import bitmixer_core as core
    from orchestrator.data.loaders import build_loaders
    from orchestrator.engine.checkpoint import load_weights, state_dict_digest
    from orchestrator.engine.deepspeed_config import align_buffers, deepspeed_config
    from orchestrator.engine.evaluation import evaluate_stage, per_bit_table
    from orchestrator.engine.schedule import warmup_cosine
    from orchestrator.engine.step import train_step
    from orchestrator.engine.subnets import SubnetSampler, set_stage_precision
    from orchestrator.tracking.stage_run import TAG_INIT_DIGEST, RunLogger

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = _device(use_gpu)
    stage = cfg.policy.stage
    bits = list(cfg.model.bits_activations)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    net = cfg.model.build()
    set_stage_precision(net, stage)

    resume = ray.train.get_checkpoint()
    logger = RunLogger(cfg.tracking.tracking_uri, loop_config["run_id"]) if rank == 0 else None
    if cfg.init_from and resume is None:
        payload = load_weights(net, cfg.init_from, expect_model=cfg.model.name, bn=cfg.model.bn,
                               tracking_uri=cfg.tracking.tracking_uri)
        if logger:  # which weights this stage started from, before anything changes them
            logger.tag(TAG_INIT_DIGEST, state_dict_digest(net.state_dict()))
        # What the core's Stage does when it starts from the previous one (step sizes, mixed BN entries).
        if payload.get("stage") in core.STAGES:
            core.get_stage(stage).start_from(net, core.get_stage(payload["stage"]))
    net.to(device)

    train_loader, val_loader = build_loaders(cfg.data, rank=rank, world_size=world_size, device=device,
                                             distributed=world_size > 1)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.optim.epochs
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))

    if stage != "fp32" and resume is None and not _quantization_initialised(net):
        core.calibrate_activation_step_sizes(net, _first_images(train_loader, 0))
    _broadcast_from_rank0(net)

    ds_config = deepspeed_config(cfg, world_size=world_size, use_gpu=use_gpu)
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=[p for p in net.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: warmup_cosine(opt, total_steps=total_steps, warmup_steps=warmup_steps,
                                               lr_peak=cfg.optim.lr_peak, lr_final=cfg.optim.lr_final),
        dist_init_required=False)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    align_buffers(engine.module, dtype)
    teacher = _load_teacher(cfg, device)
    sampler = SubnetSampler(engine.module, cfg.policy, cfg.model, cfg.seed)

    start_epoch, resumed_from = 0, -1
    if resume is not None:
        with resume.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
        start_epoch = int(client_state["epoch"]) + 1
        resumed_from = start_epoch
    global_step = start_epoch * steps_per_epoch

    accumulation = cfg.deepspeed.grad_accumulation
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        train_loader.set_epoch(epoch)
        engine.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for i, (images, labels) in enumerate(train_loader):
            # One sub-net per optimizer step, the same on every rank.
            step_loss, step_images = train_step(engine, images, labels, sampler=sampler, global_step=global_step,
                                                epoch=epoch + i / steps_per_epoch, accumulation=accumulation,
                                                distill=cfg.distill, teacher=teacher, dtype=dtype)
            loss_sum += torch.tensor([step_loss, step_images], dtype=torch.float64)
            global_step += 1
        if dist.is_initialized():
            dist.all_reduce(loss_sum)  # the mean training loss over every rank's images
        epoch_time = time.perf_counter() - started
        metrics = {"epoch": epoch, "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                   "lr": engine.get_lr()[0], "epoch_time_s": epoch_time, "global_step": global_step,
                   "resumed_at_epoch": resumed_from, "subnet_draws": sampler.draws}
        last = epoch == cfg.optim.epochs - 1
        evaluated = last or (epoch + 1) % cfg.eval_every_epochs == 0
        table = None
        if evaluated:
            metrics.update(evaluate_stage(engine.module, val_loader, stage=stage, bits=bits,
                                          rand_seeds=cfg.rand_seeds, device=device, dtype=dtype))
            table = per_bit_table(metrics, bits=bits, stage=stage, first_last=cfg.model.first_last,
                                  bits_weights=list(cfg.model.bits_weights))
        # Every rank's digest travels to rank 0's report so the driver can compare the draws.
        digests = [None] * world_size
        if dist.is_initialized():
            dist.all_gather_object(digests, sampler.digest)
        else:
            digests = [sampler.digest]
        metrics["subnet_digests"] = digests

        folder = Path(tempfile.mkdtemp(prefix=f"bitmixer-{cfg.name}-e{epoch}-"))
        try:
            engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, client_state={"epoch": epoch},
                                   save_latest=True)
            if rank == 0:
                _record_epoch(cfg, logger, engine.module, folder, metrics, table, last=last)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        _crash_if_asked(cfg, epoch, rank, world_size, loop_config.get("run_dir"))

#!/usr/bin/env bash
# GPU check of the training engine (issue 4), for sessions lent a GPU; never part of the tests.
#
# Trains resnet18 (ImageNet stem, 1000 classes) at 224x224 on synthetic batches through the engine's own
# pieces -- the DeepSpeed engine built from our generated config (ZeRO-1, torch Adam, bf16 when asked), the
# per-iteration cosine schedule, the per-step seeded sub-net sampler and `train_step` (what every Ray worker
# runs per step) -- in one process on GPU 0:
#   1. FP32 baseline: policy "fp32" (nothing quantized), fp32 engine
#   2. Stage III:      policy "three" (k=0.75, ramp done), every layer at its own bit-width, bf16 engine
# and prints images/s for both and their ratio. Ray and FFCV are left out on purpose: they are measured by
# the integration tests and bench/loader.py, and would only add start-up time here.
#
# Usage:  bench/gpu_check.sh                 (env: STEPS=300 WARMUP=30 BATCH=128 TIME_LIMIT_S=450)
#         DRY_RUN_ON_CPU=1 STEPS=2 WARMUP=1 BATCH=4 bench/gpu_check.sh   checks the script itself on a CPU
#         machine (gloo instead of NCCL; the figures mean nothing there).
# Checks itself: exits non-zero when no GPU is visible, a loss is not finite, the bf16 engine does not hold
# bf16 weights, Stage III drew fewer than 2 distinct sub-nets, or the run passes TIME_LIMIT_S (under 8 min).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

if [ "${DRY_RUN_ON_CPU:-0}" = 1 ]; then
  echo "gpu_check: DRY RUN on CPU (figures are meaningless)"
  export DS_ACCELERATOR=cpu
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi is not on PATH; run this on a machine with an NVIDIA GPU." >&2
  exit 2
else
  echo "gpu_check: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
fi

export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/bitmixer/torch_extensions}"
# A one-process torch.distributed group (DeepSpeed needs one), on loopback.
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29517}" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

timeout "${TIME_LIMIT_S:-450}" "$PY" - <<'PYTHON'
import json
import math
import os
import sys
import time

import torch

DRY_RUN = os.environ.get("DRY_RUN_ON_CPU") == "1"
if not DRY_RUN and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
             "install torch's CUDA build, e.g. TORCH_VERSION=2.13.0+cu128 infra/setup.sh.")

import deepspeed

import bitmixer_core as core
from orchestrator.engine.config import StageConfig
from orchestrator.engine.deepspeed_config import align_buffers, deepspeed_config
from orchestrator.engine.schedule import warmup_cosine
from orchestrator.engine.step import train_step
from orchestrator.engine.subnets import SubnetSampler, set_stage_precision

STEPS, WARMUP, BATCH = (int(os.environ.get(k, d)) for k, d in (("STEPS", 300), ("WARMUP", 30), ("BATCH", 128)))
device = torch.device("cpu") if DRY_RUN else torch.device("cuda", 0)
if not DRY_RUN:
    torch.cuda.set_device(device)
deepspeed.init_distributed(dist_backend="gloo" if DRY_RUN else "nccl", auto_mpi_discovery=False)


def synchronize() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


def stage_config(stage: str, bf16: bool) -> StageConfig:
    return StageConfig.model_validate(dict(
        name=f"gpu-check-{stage}",
        model=dict(name="resnet18", num_classes=1000, stem="imagenet"),
        data=dict(path="synthetic", batch_size=BATCH),
        optim=dict(epochs=1, warmup_epochs=0),
        policy=dict(stage=stage, k=0.75, ramp_epochs=0),
        deepspeed=dict(bf16_on_gpu=bf16),
        scaling=dict(num_workers=1, use_gpu=True),
        tracking=dict(tracking_uri="sqlite:////tmp/gpu_check_unused.db"),
    ))


def measure(stage: str, bf16: bool) -> dict:
    cfg = stage_config(stage, bf16)
    torch.manual_seed(0)
    net = cfg.model.build()
    set_stage_precision(net, stage)
    net.to(device)
    images = torch.randn(BATCH, 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (BATCH,), device=device)
    if stage != "fp32":
        core.calibrate_activation_step_sizes(net, images)
    ds_config = deepspeed_config(cfg, world_size=1, use_gpu=True)
    total = WARMUP + STEPS
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=[p for p in net.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: warmup_cosine(opt, total_steps=total, warmup_steps=0, lr_peak=cfg.optim.lr_peak),
        dist_init_required=False)
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    align_buffers(engine.module, dtype)
    weight_dtype = next(engine.module.parameters()).dtype
    if weight_dtype != dtype:
        sys.exit(f"gpu_check: the {stage} engine holds {weight_dtype} weights, expected {dtype}.")
    sampler = SubnetSampler(engine.module, cfg.policy, cfg.model, run_seed=0)
    seen = set()
    engine.train()
    started = None
    for step in range(total):
        if step == WARMUP:
            synchronize()
            started = time.perf_counter()
        loss_sum, count = train_step(engine, images, labels, sampler=sampler, global_step=step, epoch=1.0,
                                     accumulation=1, distill=cfg.distill, dtype=dtype)
        if not math.isfinite(loss_sum / count):
            sys.exit(f"gpu_check: {stage} loss is {loss_sum / count} at step {step}.")
        if stage != "fp32":
            seen.add(tuple(core.get_bits(engine.module).values()))
    synchronize()
    elapsed = time.perf_counter() - started
    if stage == "three" and len(seen) < 2:
        sys.exit(f"gpu_check: Stage III drew {len(seen)} distinct sub-net(s) in {total} steps; expected many.")
    result = {"stage": stage, "dtype": str(dtype).removeprefix("torch."), "batch": BATCH, "steps": STEPS,
              "seconds": round(elapsed, 2), "images_per_s": round(STEPS * BATCH / elapsed, 1),
              "distinct_subnets": len(seen), "last_loss": round(loss_sum / count, 4),
              "peak_memory_gib": 0.0 if DRY_RUN else round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    print("gpu_check:", json.dumps(result), flush=True)
    del engine, net
    if not DRY_RUN:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


baseline = measure("fp32", bf16=False)
mixed = measure("three", bf16=True)
ratio = mixed["images_per_s"] / baseline["images_per_s"]
print(f"gpu_check: {'CPU dry run' if DRY_RUN else torch.cuda.get_device_name(0)}, resnet18 224x224 batch {BATCH}, {STEPS} timed steps")
print(f"gpu_check: FP32 baseline {baseline['images_per_s']:.1f} images/s; Stage III bf16 "
      f"{mixed['images_per_s']:.1f} images/s; ratio (Stage III / FP32) {ratio:.3f}")
PYTHON

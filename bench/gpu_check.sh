#!/usr/bin/env bash
# GPU check of the training engine, for sessions lent a GPU; never part of the tests.
#
# Trains a ResNet (MODEL, resnet18 by default; ImageNet stem, 1000 classes, the default block order) at
# 224x224 on synthetic batches through the engine's own pieces -- the DeepSpeed engine built from our generated config
# (ZeRO-1, torch Adam, the worker's optimizer groups, bf16 autocast when asked), the per-iteration cosine schedule,
# the per-step seeded sub-net sampler and `train_step` (what every Ray worker runs per step) -- in one
# process on GPU 0, and measures images/s of:
#   plain   the same ResNet of plain nn.Conv2d / nn.BatchNorm2d, fp32 engine (the price of ordinary training)
#   fp32    the meta-network with policy "fp32" (nothing quantized), fp32 engine: the FP32 baseline
#   three   Stage III (k=0.75, ramp done, every layer at its own bit-width), bf16 autocast engine
#   three32 the same in a float32 engine (RUNS names it)
#   three32c  Stage III in a float32 engine with the compiled regions (bitmixer_core.compile_fused_regions:
#           inductor's fused BN -> ReLU -> quantizer kernels; float32 only, so not the bf16 run), RUNS names it
# each with NCHW and with channels-last input images (CHANNELS_LAST=both), and prints the card, every figure
# and the ratio Stage III bf16 / FP32 baseline (each at its faster memory format, and per format).
# Ray and FFCV are left out on purpose: bench/loader.py and the integration tests measure them.
#
# Usage (one command, at most about 6 minutes on an H100: six runs of at most 30 s timed plus set-up each;
# a hard stop at TIME_LIMIT_S):
#   bench/gpu_check.sh
#     env: STEPS=200 WARMUP=20 BATCH=128 MAX_TIMED_S=30 (a timed loop stops early past it)
#          CHANNELS_LAST=both|0|1  CUDNN_BENCHMARK=1  PLAIN=1  TIME_LIMIT_S=540
#          RESULT_JSON=runs/gpu_check.json (the figures as JSON)  WHEELS=build/gpu_wheels
#          RUNS=plain,fp32,three (which networks; also three32, three32c)
#          ZERO_STAGE=1 (the engine's ZeRO stage, 0-2)  MODEL=resnet18 (any registered ResNet; ImageNet stem)
#          PROFILE_STEPS=0 (after each timed loop, that many steps under torch.profiler: per step, the
#            operators, the kernel launches, the GPU's busy time against the wall, and the top operators)
#   DRY_RUN_ON_CPU=1 STEPS=2 WARMUP=1 BATCH=2 bench/gpu_check.sh   checks the script itself on a CPU
#     machine (gloo instead of NCCL; the figures mean nothing there).
# A GPU machine with no internet and no DeepSpeed/pydantic: run bench/gpu_wheels.sh on a machine with
# internet first; this script installs build/gpu_wheels/*.whl into a scratch folder when the import fails.
# Checks itself: exits non-zero when no GPU is visible, a loss is not finite, the bf16 engine does not compute
# in bf16 or holds anything but float32 weights and BN statistics, Stage III drew fewer than 2 distinct sub-nets, or the run
# passes TIME_LIMIT_S.
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
  echo "gpu_check: card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
  export DS_ACCELERATOR=cuda
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import deepspeed, pydantic" >/dev/null 2>&1; then
  WHEELS="${WHEELS:-build/gpu_wheels}"
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: $PY cannot import deepspeed and pydantic, and $WHEELS holds no wheels;" \
         "run bench/gpu_wheels.sh where pip has internet and bring $WHEELS along." >&2
    exit 2
  fi
  SITE="${TMPDIR:-/tmp}/gpu_check_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
  echo "gpu_check: installed $(ls "$WHEELS" | wc -l) wheels from $WHEELS into $SITE"
fi

export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/bitmixer/torch_extensions}"
# A one-process torch.distributed group (DeepSpeed needs one), on loopback.
export MASTER_ADDR=127.0.0.1 MASTER_PORT="${MASTER_PORT:-29517}" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1

timeout "${TIME_LIMIT_S:-540}" "$PY" - <<'PYTHON'
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

DRY_RUN = os.environ.get("DRY_RUN_ON_CPU") == "1"
if not DRY_RUN and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
             "install torch's CUDA build, e.g. TORCH_VERSION=2.13.0+cu128 infra/setup.sh.")

import deepspeed

import bitmixer_core as core
from bitmixer_core.models import MODEL_SPECS, ResNet
from orchestrator.engine.config import StageConfig
from orchestrator.engine.deepspeed_config import deepspeed_config, parameter_groups
from orchestrator.engine.precision import compute_dtype
from orchestrator.engine.schedule import warmup_cosine
from orchestrator.engine.step import train_step
from orchestrator.engine.subnets import SubnetSampler, set_stage_precision

env = os.environ.get
STEPS, WARMUP, BATCH = int(env("STEPS", 200)), int(env("WARMUP", 20)), int(env("BATCH", 128))
MODEL = env("MODEL", "resnet18")
MAX_TIMED_S = float(env("MAX_TIMED_S", 30))
PROFILE_STEPS = int(env("PROFILE_STEPS", 0))
ZERO_STAGE = int(env("ZERO_STAGE", 1))
LAYOUTS = {"both": (False, True), "0": (False,), "1": (True,)}.get(env("CHANNELS_LAST", "both"))
if LAYOUTS is None:
    sys.exit(f"gpu_check: CHANNELS_LAST must be both, 0 or 1, got {env('CHANNELS_LAST')!r}.")
device = torch.device("cpu") if DRY_RUN else torch.device("cuda", 0)
if not DRY_RUN:
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = env("CUDNN_BENCHMARK", "1") == "1"
deepspeed.init_distributed(dist_backend="gloo" if DRY_RUN else "nccl", auto_mpi_discovery=False)
card = "CPU dry run" if DRY_RUN else torch.cuda.get_device_name(0)


def synchronize() -> None:
    if not DRY_RUN:
        torch.cuda.synchronize()


class NoDraw:
    """The plain network has no sub-nets: the step's draw does nothing."""

    def apply(self, global_step, epoch):
        return None


def stage_config(stage: str, bf16: bool) -> StageConfig:
    return StageConfig.model_validate(dict(
        name=f"gpu-check-{stage}",
        model=dict(name=MODEL, num_classes=1000, stem="imagenet"),
        data=dict(path="synthetic", batch_size=BATCH),
        optim=dict(epochs=1, warmup_epochs=0),
        policy=dict(stage=stage, k=0.75, ramp_epochs=0),
        deepspeed=dict(bf16_on_gpu=bf16, zero_stage=ZERO_STAGE),
        scaling=dict(num_workers=1, use_gpu=True),
        tracking=dict(tracking_uri="sqlite:////tmp/gpu_check_unused.db"),
    ))


def profile(name, engine, images, labels, sampler, cfg, dtype, start: int) -> dict:
    """PROFILE_STEPS more steps under torch.profiler: whether the step waits on the GPU or on Python. Returns the
    per-step figures (bench/scaling.py reads gpu_busy_ms to tell a host-bound step from a GPU-bound one)."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([] if DRY_RUN else [ProfilerActivity.CUDA])
    synchronize()
    began = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for step in range(start, start + PROFILE_STEPS):
            train_step(engine, images, labels, sampler=sampler, global_step=step, epoch=1.0, accumulation=1,
                       distill=cfg.distill, dtype=dtype)
        synchronize()
    wall_ms = (time.perf_counter() - began) * 1e3 / PROFILE_STEPS
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::")) / PROFILE_STEPS
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / PROFILE_STEPS
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]  # each kernel once
    busy_ms = sum(e.device_time_total for e in kernels) / 1e3 / PROFILE_STEPS
    print(f"gpu_check: profile {name}: {wall_ms:.1f} ms a step (profiled), {ops:.0f} aten ops, "
          f"{launches:.0f} kernel launches, GPU busy {busy_ms:.1f} ms a step", flush=True)
    key = "self_cpu_time_total" if DRY_RUN else "self_device_time_total"
    print(events.table(sort_by=key, row_limit=12, max_name_column_width=48), flush=True)
    if not DRY_RUN:
        print(events.table(sort_by="count", row_limit=12, max_name_column_width=48), flush=True)
    return {"wall_ms_profiled": round(wall_ms, 1), "gpu_busy_ms": round(busy_ms, 1), "aten_ops": round(ops),
            "kernel_launches": round(launches)}


def measure(name: str, stage: str, bf16: bool, compiled: bool, channels_last: bool) -> dict:
    cfg = stage_config(stage, bf16)
    torch.manual_seed(0)
    if name == "plain":
        net = ResNet(MODEL_SPECS[MODEL], num_classes=1000, stem="imagenet", plain=True)
    else:
        net = cfg.model.build()
        set_stage_precision(net, stage)
    # Channels-last goes in through the images only: cuDNN then runs every conv (and the BNs and quantizers
    # after it) channels-last. The weights stay NCHW-contiguous because DeepSpeed broadcasts parameters as
    # byte views and ZeRO/bf16 flatten them into one buffer, both of which need the standard layout.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net.to(device)
    images = torch.randn(BATCH, 3, 224, 224, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 1000, (BATCH,), device=device)
    if stage != "fp32":
        core.calibrate_activation_step_sizes(net, images)
    if compiled:  # inductor builds each region's graph in the warm-up steps, before the timed loop
        core.compile_fused_regions(net)
    ds_config = deepspeed_config(cfg, world_size=1, use_gpu=True)
    total = WARMUP + STEPS
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=parameter_groups(net), config=ds_config,
        lr_scheduler=lambda opt: warmup_cosine(opt, total_steps=total, warmup_steps=0, lr_peak=cfg.optim.lr_peak),
        dist_init_required=False)
    dtype = compute_dtype(ds_config)
    weight_dtypes = {p.dtype for p in engine.module.parameters()}
    if weight_dtypes != {torch.float32}:
        sys.exit(f"gpu_check: the {name} engine holds {weight_dtypes} weights, expected float32.")
    logits_dtypes = set()
    engine.module.fc.register_forward_hook(lambda module, args, out: logits_dtypes.add(out.dtype))
    sampler = NoDraw() if name == "plain" else SubnetSampler(engine.module, cfg.policy, cfg.model, run_seed=0)
    seen = set()
    engine.train()
    started, timed = None, 0
    for step in range(total):
        if step == WARMUP:
            synchronize()
            started = time.perf_counter()
        loss_sum, count = train_step(engine, images, labels, sampler=sampler, global_step=step, epoch=1.0,
                                     accumulation=1, distill=cfg.distill, dtype=dtype)
        if not math.isfinite(loss_sum / count):
            sys.exit(f"gpu_check: {name} loss is {loss_sum / count} at step {step}.")
        if stage != "fp32" and name != "plain":
            seen.add(tuple(core.get_bits(engine.module).values()))
        if started is not None:
            timed += 1
            if time.perf_counter() - started > MAX_TIMED_S:  # loss.item() above has synchronised
                break
    synchronize()
    elapsed = time.perf_counter() - started
    profiled = profile(name, engine, images, labels, sampler, cfg, dtype, start=total) if PROFILE_STEPS else None
    if logits_dtypes != {dtype}:
        sys.exit(f"gpu_check: the {name} engine computed its logits in {logits_dtypes}, expected {dtype}.")
    if stage == "three" and len(seen) < 2:
        sys.exit(f"gpu_check: Stage III drew {len(seen)} distinct sub-net(s) in {total} steps; expected many.")
    bn_dtypes = {b.dtype for n, b in engine.module.named_buffers() if n.endswith(("running_mean", "running_var"))}
    if bn_dtypes != {torch.float32}:
        sys.exit(f"gpu_check: the {name} engine's BN running statistics are {bn_dtypes}, expected float32.")
    result = {"name": name, "stage": stage, "zero_stage": ZERO_STAGE, "dtype": str(dtype).removeprefix("torch."),
              "channels_last": channels_last, "batch": BATCH, "timed_steps": timed,
              "seconds": round(elapsed, 2), "images_per_s": round(timed * BATCH / elapsed, 1),
              "distinct_subnets": len(seen), "last_loss": round(loss_sum / count, 4),
              "peak_memory_gib": 0.0 if DRY_RUN else round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if profiled:
        result["profile"] = profiled
    print("gpu_check:", json.dumps(result), flush=True)
    del engine, net
    if not DRY_RUN:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


KNOWN_RUNS = {"plain": ("plain", "fp32", False, False), "fp32": ("fp32", "fp32", False, False),
              "three": ("three", "three", True, False), "three32": ("three32", "three", False, False),
              "three32c": ("three32c", "three", False, True)}
names = env("RUNS", "plain,fp32,three" if env("PLAIN", "1") == "1" else "fp32,three").split(",")
if not {"fp32", "three"} <= set(names) or not set(names) <= set(KNOWN_RUNS):
    sys.exit(f"gpu_check: RUNS must name fp32 and three, and only {sorted(KNOWN_RUNS)}; got {names}.")
runs = [KNOWN_RUNS[n] for n in names]
results = [measure(name, stage, bf16, compiled, cl) for name, stage, bf16, compiled in runs for cl in LAYOUTS]


def best(name: str) -> dict:
    return max((r for r in results if r["name"] == name), key=lambda r: r["images_per_s"])


def layout(r: dict) -> str:
    return "channels-last" if r["channels_last"] else "NCHW"


summary = {"card": card, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
           "cudnn_benchmark": bool(torch.backends.cudnn.benchmark), "python": platform.python_version(),
           "model": MODEL, "resolution": 224, "batch": BATCH, "runs": results}
fp32, three = best("fp32"), best("three")
summary["ratio_three_bf16_over_fp32"] = round(three["images_per_s"] / fp32["images_per_s"], 3)
for cl in LAYOUTS:
    per = {r["name"]: r for r in results if r["channels_last"] == cl}
    summary[f"ratio_{'channels_last' if cl else 'nchw'}"] = round(per["three"]["images_per_s"] / per["fp32"]["images_per_s"], 3)
print(f"gpu_check: {card}, {MODEL} 224x224 batch {BATCH}, torch {torch.__version__}, "
      f"cudnn.benchmark={summary['cudnn_benchmark']}")
for r in results:
    print(f"gpu_check:   {r['name']:8s} {r['dtype']:8s} {layout(r):13s} {r['images_per_s']:8.1f} images/s "
          f"({r['timed_steps']} steps, {r['peak_memory_gib']} GiB)")
print(f"gpu_check: FP32 baseline {fp32['images_per_s']:.1f} images/s ({layout(fp32)}); Stage III bf16 "
      f"{three['images_per_s']:.1f} images/s ({layout(three)}); ratio (Stage III / FP32) "
      f"{summary['ratio_three_bf16_over_fp32']:.3f}")
if len(LAYOUTS) == 2:
    print(f"gpu_check: channels-last pays for Stage III: {three['channels_last']}; for FP32: {fp32['channels_last']}")
out = Path(env("RESULT_JSON", "runs/gpu_check.json"))
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(summary, indent=1) + "\n")
print(f"gpu_check: figures written to {out}")
PYTHON

"""The host's share of a training step, without a GPU: one step of the DeepSpeed engine (our config, ZeRO-1,
gloo, one process) split into its phases -- the sub-net draw, the forward, the backward, the optimizer step --
on a ResNet-18 whose every layer is narrowed to `--width` channels, so that the arithmetic is negligible and
what is left is what the host pays per step whatever the batch: Python, operator dispatch, autograd, the
optimizer's work per parameter tensor. On a GPU that host time is a floor under the step (docs/benchmarks.md,
"GPU"); here it is measured on the CPU, with the same code, as a proxy. Also counts the aten operators of each
phase (on a GPU most of them launch a kernel).

    .venv/bin/python bench/step_host.py [--runs plain fp32 three] [--autocast] [--compiled] [--zero 1]
                                        [--width 8] [--steps 20]

plain: the same narrow ResNet-18 of nn.Conv2d / nn.BatchNorm2d; fp32: the meta-network with nothing quantized
(the FP32 baseline); three: Stage III (k = 0.75, a new sub-net every step). --autocast: the engine config of a GPU
stage (bf16 autocast; CPU autocast here). --compiled: Stage III with bitmixer_core.compile_fused_regions.
Figures: medians over the timed steps, one thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29571"), RANK="0",
                  LOCAL_RANK="0", WORLD_SIZE="1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import profile  # noqa: E402

PHASES = ("draw", "forward", "backward", "step")


def build(run: str, width: int, autocast: bool, zero: int, compiled: bool):
    import deepspeed

    import bitmixer_core as core
    from bitmixer_core.models import MODEL_SPECS, ResNet
    from orchestrator.engine.config import StageConfig
    from orchestrator.engine.deepspeed_config import deepspeed_config, parameter_groups
    from orchestrator.engine.subnets import SubnetSampler, set_stage_precision

    stage = "three" if run == "three" else "fp32"
    spec = dataclasses.replace(MODEL_SPECS["resnet18"], widths=(width,) * 4, stem_width=width)
    cfg = StageConfig.model_validate(dict(
        name=f"host-{run}", model=dict(name="resnet18", num_classes=10, stem="imagenet"),
        data=dict(path="/unused", batch_size=2), optim=dict(epochs=1, warmup_epochs=0),
        policy=dict(stage=stage, k=0.75, ramp_epochs=0), deepspeed=dict(zero_stage=zero, bf16_on_gpu=autocast),
        scaling=dict(num_workers=1, use_gpu=autocast), tracking=dict(tracking_uri="sqlite:////tmp/unused.db")))
    torch.manual_seed(0)
    net = ResNet(spec, num_classes=10, stem="imagenet", plain=run == "plain")
    if run != "plain":
        set_stage_precision(net, stage)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    if stage == "three":
        core.calibrate_activation_step_sizes(net, images)
        if compiled:
            core.compile_fused_regions(net)
    config = deepspeed_config(cfg, world_size=1, use_gpu=autocast)
    engine = deepspeed.initialize(model=net, model_parameters=parameter_groups(net), config=config,
                                  dist_init_required=False)[0]
    sampler = SubnetSampler(engine.module, cfg.policy, cfg.model, run_seed=0) if stage == "three" else None
    tensors = sum(1 for _ in engine.module.parameters())
    return engine, sampler, images, labels, tensors


def one_step(engine, sampler, images, labels, step: int) -> list[float]:
    """Seconds of each phase; the CPU finishes each before the next starts, so these are host times."""
    clock = time.perf_counter
    began = clock()
    if sampler is not None:
        sampler.apply(step, 1.0)
    drawn = clock()
    loss = F.cross_entropy(engine(images).float(), labels)
    forward = clock()
    engine.backward(loss)
    backward = clock()
    engine.step()
    return [drawn - began, forward - drawn, backward - forward, clock() - backward]


def operators(engine, sampler, images, labels, step: int) -> list[int]:
    """aten operators of each phase of one step."""
    counts = []
    for phase in PHASES:
        with profile() as prof:
            if phase == "draw" and sampler is not None:
                sampler.apply(step, 1.0)
            elif phase == "forward":
                loss = F.cross_entropy(engine(images).float(), labels)
            elif phase == "backward":
                engine.backward(loss)
            elif phase == "step":
                engine.step()
        counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["plain", "fp32", "three"], choices=["plain", "fp32", "three"])
    parser.add_argument("--autocast", action="store_true", help="the engine config of a GPU stage (bf16 autocast)")
    parser.add_argument("--compiled", action="store_true", help="Stage III with the compiled regions")
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    print(f"ResNet-18 at width {args.width}, 32 px, batch 2, ZeRO-{args.zero}, "
          f"{'bf16 autocast' if args.autocast else 'float32'}, one thread; host ms per phase (median of "
          f"{args.steps} steps) and aten operators per phase")
    print(f"{'run':14s} {'tensors':>7s} " + " ".join(f"{p:>9s}" for p in PHASES) + f" {'total':>8s} {'operators':>30s}")
    for run in args.runs:
        engine, sampler, images, labels, tensors = build(run, args.width, args.autocast, args.zero,
                                                         args.compiled and run == "three")
        for step in range(5):  # warm-up (the compiled regions build their graphs here)
            one_step(engine, sampler, images, labels, step)
        rows = [one_step(engine, sampler, images, labels, step) for step in range(5, 5 + args.steps)]
        medians = [statistics.median(r[i] for r in rows) * 1e3 for i in range(len(PHASES))]
        ops = operators(engine, sampler, images, labels, 5 + args.steps)
        name = f"{run}{' compiled' if args.compiled and run == 'three' else ''}"
        print(f"{name:14s} {tensors:7d} " + " ".join(f"{m:9.1f}" for m in medians) + f" {sum(medians):8.1f} "
              f"{'/'.join(str(o) for o in ops):>30s}")


if __name__ == "__main__":
    main()

"""Time one training step (forward + backward + Adam) of the Bit-Mixer ResNet-18 in Stage III against the
same network built from plain nn.Conv2d / nn.BatchNorm2d, in the same process.

    .venv/bin/python bench/train_step.py [--repeats 10] [--batch 64] [--threads N] [--profile]

Steps are interleaved (quantized, plain, quantized, ...) so that drifts in machine load hit both; the figure
is the median of the per-pair time ratios, for wall-clock time and for this process's CPU time (the latter
is the steadier figure on a machine shared with other jobs). The Stage III sub-net is redrawn (layer-wise, k = 0.75) before
every quantized step, as in training. `--profile` then prints where a Stage III step and a plain step spend
their CPU time (torch.profiler, the operators with the most self time over 3 steps of each)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bitmixer_core import (StagePolicy, apply_assignment, build_model, calibrate_activation_step_sizes,
                           quantized_layers, residual_blocks)
from bitmixer_core.models import MODEL_SPECS, ResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print the operators with most self CPU time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))

    meta = build_model("resnet18", num_classes=10, stem="small")
    plain = ResNet(MODEL_SPECS["resnet18"], num_classes=10, stem="small", plain=True)
    calibrate_activation_step_sizes(meta, images)
    policy = StagePolicy.stage_three((2, 3, 4), k=0.75, ramp_epochs=0)
    names = [n for n, _ in quantized_layers(meta)]
    blocks = residual_blocks(meta)
    generator = torch.Generator().manual_seed(0)
    optimizers = {id(m): torch.optim.Adam(m.parameters(), lr=1e-3) for m in (meta, plain)}

    def step(model) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        if model is meta:
            apply_assignment(meta, policy.sample(names, blocks, epoch=100.0, generator=generator))
        optimizer = optimizers[id(model)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - start_cpu

    for model in (meta, plain):  # warm-up (allocator, first-batch initialisation)
        model.train()
        step(model)
        step(model)
    pairs = [(step(meta), step(plain)) for _ in range(args.repeats)]
    median = statistics.median
    print(f"threads={torch.get_num_threads()} batch={args.batch} repeats={args.repeats}")
    for k, clock in enumerate(("wall", "cpu")):
        meta_t, plain_t = [q[k] for q, _ in pairs], [p[k] for _, p in pairs]
        ratio = median([q[k] / p[k] for q, p in pairs])
        print(f"{clock:4s}: Bit-Mixer Stage III {median(meta_t) * 1e3:.0f} ms, plain {median(plain_t) * 1e3:.0f} ms, "
              f"ratio (median of interleaved pairs) {ratio:.3f}x")
    if args.profile:
        for model, title in ((meta, "Bit-Mixer Stage III"), (plain, "plain")):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step(model)
            print(f"\n{title}, 3 steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

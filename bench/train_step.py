"""Time one training step (forward + backward + Adam) of the Bit-Mixer ResNet-18 in Stage III against the
same network built from plain nn.Conv2d / nn.BatchNorm2d, in the same process.

    .venv/bin/python bench/train_step.py [--repeats 10] [--batch 64] [--threads N]

Steps are interleaved (quantized, plain, quantized, ...) so that drifts in machine load hit both; the figure
is the median of the per-pair time ratios. The Stage III sub-net is redrawn (layer-wise, k = 0.75) before
every quantized step, as in training."""

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

    def step(model) -> float:
        start = time.perf_counter()
        if model is meta:
            apply_assignment(meta, policy.sample(names, blocks, epoch=100.0, generator=generator))
        optimizer = optimizers[id(model)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start

    for model in (meta, plain):  # warm-up (allocator, first-batch initialisation)
        model.train()
        step(model)
        step(model)
    ratios, meta_times, plain_times = [], [], []
    for _ in range(args.repeats):
        tq, tp = step(meta), step(plain)
        meta_times.append(tq)
        plain_times.append(tp)
        ratios.append(tq / tp)
    print(f"threads={torch.get_num_threads()} batch={args.batch} repeats={args.repeats}")
    print(f"Bit-Mixer Stage III step: median {statistics.median(meta_times) * 1e3:.1f} ms")
    print(f"plain nn.Conv2d/BatchNorm2d step: median {statistics.median(plain_times) * 1e3:.1f} ms")
    print(f"ratio (median of interleaved pairs): {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()

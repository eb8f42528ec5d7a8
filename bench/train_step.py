"""Time one training step (forward + backward + Adam) of the Bit-Mixer ResNet-18 in Stage III against the
same network built from plain nn.Conv2d / nn.BatchNorm2d, in the same process.

    .venv/bin/python bench/train_step.py [--repeats 10] [--batch 64] [--threads N] [--profile] [--no-reference]
                                         [--compiled]

Steps are interleaved (fast path, reference path, plain, fast path, ...) so that drifts in machine load hit
all of them; the figure is the median of the per-round time ratios, for wall-clock time and for this
process's CPU time (the latter is the steadier figure on a machine shared with other jobs). The reference
path (layers.set_reference_path: every ReLU kept) is the same network with the same weights, outputs and
gradients; it gives the before figure in the same run. `--compiled` adds a third Stage III row: the same network
with its BN -> (+ shortcut) -> ReLU -> quantizer regions and weight quantizers compiled
(bitmixer_core.compile_fused_regions); its one-time compile (the two warm-up steps, with inductor's on-disk
cache as found; point TORCHINDUCTOR_CACHE_DIR at an empty folder for a cold figure) is printed and left out of
the medians. The Stage III sub-net is redrawn (layer-wise, k = 0.75) before every quantized step, as in
training. `--profile` then prints where a Stage III step and a plain step spend
their CPU time (torch.profiler, the operators with the most self time over 3 steps of each).

The bench runs with the allocator settings a stage's Ray workers start with (orchestrator.engine.process_env;
it restarts itself with them), so its steps are the workers' steps; `--glibc-defaults` leaves them out."""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitmixer_core import (StagePolicy, apply_assignment, build_model, calibrate_activation_step_sizes,
                           quantized_layers, residual_blocks)
from bitmixer_core.layers import set_reference_path
from bitmixer_core.models import MODEL_SPECS, ResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="also print the operators with most self CPU time")
    parser.add_argument("--no-reference", action="store_true", help="leave the reference path out of the rounds")
    parser.add_argument("--compiled", action="store_true",
                        help="also step the network with its BN -> ReLU -> quantizer regions compiled")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="glibc's allocator defaults instead of the settings the training workers start with")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from orchestrator.engine.process_env import ALLOCATOR_VARIABLES
    wanted = {} if args.glibc_defaults else ALLOCATOR_VARIABLES
    if any(os.environ.get(k) != wanted.get(k) for k in ALLOCATOR_VARIABLES):  # glibc reads them at start only
        env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARIABLES}
        os.execve(sys.executable, [sys.executable, *sys.argv], {**env, **wanted})
    print("allocator: " + ("glibc's defaults" if args.glibc_defaults else
                           " ".join(f"{k}={v}" for k, v in ALLOCATOR_VARIABLES.items())), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))

    meta = build_model("resnet18", num_classes=10, stem="small")
    plain = ResNet(MODEL_SPECS["resnet18"], num_classes=10, stem="small", plain=True)
    calibrate_activation_step_sizes(meta, images)
    reference = copy.deepcopy(meta)
    set_reference_path(reference, True)
    policy = StagePolicy.stage_three((2, 3, 4), k=0.75, ramp_epochs=0)
    names = [n for n, _ in quantized_layers(meta)]
    blocks = residual_blocks(meta)
    generator = torch.Generator().manual_seed(0)
    models = {"Bit-Mixer Stage III": meta, "Stage III, reference path": reference, "plain": plain}
    if args.no_reference:
        del models["Stage III, reference path"]
    if args.compiled:
        from bitmixer_core import compile_fused_regions
        models["Stage III, compiled regions"] = compile_fused_regions(copy.deepcopy(meta))
    optimizers = {id(m): torch.optim.Adam(m.parameters(), lr=1e-3) for m in models.values()}

    def step(model, assignment=None) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        if model is not plain:
            apply_assignment(model, assignment or policy.sample(names, blocks, epoch=100.0, generator=generator))
        optimizer = optimizers[id(model)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        return time.perf_counter() - start, time.process_time() - start_cpu

    for title, model in models.items():  # warm-up (allocator, first-batch initialisation, compilation)
        model.train()
        start = time.perf_counter()
        step(model)
        step(model)
        if title == "Stage III, compiled regions":
            print(f"compiled regions: first two steps (compilation included) {time.perf_counter() - start:.1f} s, "
                  f"{_graphs()} graphs", flush=True)

    def one_round() -> dict[str, tuple[float, float]]:
        """One step of each model; both Stage III paths train the same newly drawn sub-net."""
        assignment = policy.sample(names, blocks, epoch=100.0, generator=generator)
        return {title: step(model, assignment) for title, model in models.items()}

    rounds = [one_round() for _ in range(args.repeats)]
    if args.compiled:  # every round drew a new sub-net: new data for the compiled regions, not new graphs
        print(f"compiled regions: {_graphs()} graphs after {args.repeats} more sub-nets")
    median = statistics.median
    print(f"threads={torch.get_num_threads()} batch={args.batch} repeats={args.repeats}")
    for k, clock in enumerate(("wall", "cpu")):
        plain_ms = median(r["plain"][k] for r in rounds) * 1e3
        for title in models:
            if title != "plain":
                ms = median(r[title][k] for r in rounds) * 1e3
                ratio = median(r[title][k] / r["plain"][k] for r in rounds)
                print(f"{clock:4s}: {title} {ms:.0f} ms, plain {plain_ms:.0f} ms, "
                      f"ratio (median of interleaved rounds) {ratio:.3f}x")
    if args.profile:
        for title, model in models.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    step(model)
            print(f"\n{title}, 3 steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def _graphs() -> int:
    """Graphs dynamo has built in this process."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


if __name__ == "__main__":
    main()

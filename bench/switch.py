"""Switching and export figures of a Bit-Mixer meta-network; prints a markdown report.

1. Switching: time of ``set_bits`` for the whole network (an int, a per-layer list, a name mapping) and of
   ``set_block_bits``, on the paper's ResNet-18 and ResNet-50 (median of many calls).
2. Sizes: exported artifact (packed n-bit weights) against the FP32 state dict, for both encodings of the
   lower bit-widths and both first/last-layer precisions; untrained weights, LSQ-initialised step sizes.
3. With ``--digits``: a resnet_tiny trained for a few epochs on the embedded digits, then
   (a) top-1 with lower bit-widths derived from the stored n-bit integers against the directly quantized
       weights (section 3.1's claim), and
   (b) the sub-net search's top candidates against random assignments of the same average bits (section 4.2).

    python bench/switch.py [--models resnet18 resnet50] [--digits] [--epochs 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import bitmixer_core as core
from bitmixer_core.export import derived_weight_agreement, export_meta_network, load_meta_network
from bitmixer_core.sensitivity import PowerIterationOptions, layer_sensitivities
from bitmixer_core.subnet_search import sample_assignments_with_total, top_k_by_average_bits


def _median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def switching(models: list[str], repeats: int) -> None:
    print("### Switching the whole network's assignment\n")
    print("| model | quantized layers | set_bits(int) | set_bits(list) | set_bits(dict) | set_block_bits(list) |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in models:
        model = core.build_model(name, num_classes=1000)
        layers = [n for n, _ in core.quantized_layers(model)]
        blocks = core.residual_blocks(model)
        draws = [list(rng.choice([2, 3, 4], size=len(layers)).tolist()) for _ in range(8)]
        i = iter(range(10**9))
        t_int = _median_us(lambda: core.set_bits(model, (2, 3, 4)[next(i) % 3]), repeats)
        t_list = _median_us(lambda: core.set_bits(model, draws[next(i) % 8]), repeats)
        t_dict = _median_us(lambda: core.set_bits(model, dict(zip(layers, draws[next(i) % 8]))), repeats)
        t_block = _median_us(lambda: core.set_block_bits(model, [(2, 3, 4)[(next(i) + k) % 3] for k in range(len(blocks))]),
                             repeats)
        print(f"| {name} | {len(layers)} | {t_int:.0f} us | {t_list:.0f} us | {t_dict:.0f} us | {t_block:.0f} us |")
    print()


def sizes(models: list[str]) -> None:
    print("### Artifact size against the FP32 state dict (untrained weights, LSQ-initialised step sizes)\n")
    print("| model | first/last | bits (w) | lower bits | artifact | FP32 state dict | ratio | packed weights | "
          "choice bits | everything else (TBN entries, step sizes, biases, FP32 layers, header) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for first_last in ("fp32", "int8"):
                kwargs = {"num_classes": 1000, "first_last": first_last}
                torch.manual_seed(0)
                model = core.build_model(name, **kwargs)
                for mode in ("derived", "exact"):
                    r = export_meta_network(model, name, kwargs, os.path.join(tmp, "m.bmx"), lower_bits=mode)
                    print(f"| {name} | {first_last} | {{2,3,4}} | {mode} | {r.artifact_bytes / 2**20:.2f} MiB | "
                          f"{r.fp32_state_dict_bytes / 2**20:.2f} MiB | {r.ratio:.3f}x | "
                          f"{r.packed_weight_bytes / 2**20:.2f} MiB | {r.lower_bit_choice_bytes / 2**20:.2f} MiB | "
                          f"{(r.artifact_bytes - r.packed_weight_bytes - r.lower_bit_choice_bytes) / 2**20:.2f} MiB |")
    print()


# ---------------------------------------------------------------------------------------------------
def _digits(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.8 * len(y))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def _train(epochs: int, seed: int):
    torch.manual_seed(seed)
    (x, y), (vx, vy) = _digits(seed)
    kwargs = {"num_classes": 10, "stem": "small", "bits": [2, 3, 4]}
    model = core.build_model("resnet_tiny", **kwargs)
    core.calibrate_activation_step_sizes(model, x[:256])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(y) // 64))
    n = len(core.quantized_layers(model))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - 63, 64):
            idx = perm[i:i + 64]
            if torch.rand((), generator=g) < 0.5:  # Stage II draw, else Stage III layer-wise draw
                core.set_bits(model, (2, 3, 4)[int(torch.randint(3, (), generator=g))])
            else:
                core.set_bits(model, [(2, 3, 4)[int(j)] for j in torch.randint(3, (n,), generator=g)])
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    val = [(vx[i:i + 128], vy[i:i + 128]) for i in range(0, len(vy), 128)]
    return model, kwargs, val


def digits_study(epochs: int, seed: int, top_k: int, randoms: int) -> None:
    model, kwargs, val = _train(epochs, seed)
    print(f"### resnet_tiny trained {epochs} epochs on the embedded digits (360 validation images)\n")
    with tempfile.TemporaryDirectory() as tmp:
        export_meta_network(model, "resnet_tiny", kwargs, os.path.join(tmp, "d.bmx"), lower_bits="derived")
        derived, _ = load_meta_network(os.path.join(tmp, "d.bmx"))
    agreement = derived_weight_agreement(model)
    print("Lower bit-widths derived from the stored 4-bit integers (section 3.1) against direct quantization:\n")
    print("| bit-width | top-1 direct | top-1 derived | difference | weights whose level agrees |")
    print("|---|---|---|---|---|")
    for b in (2, 3, 4):
        direct = core.evaluate_fixed_bits(model, val, b)["top1"]
        der = core.evaluate_fixed_bits(derived, val, b)["top1"]
        print(f"| {b} | {direct:.2f} | {der:.2f} | {der - direct:+.2f} | {100 * agreement[b]:.1f} % |")
    rand = core.evaluate_random_bits(derived, val, seeds=(0, 1, 2))
    rand_direct = core.evaluate_random_bits(model, val, seeds=(0, 1, 2))
    print(f"| Rand. | {rand_direct['top1_mean']:.2f} | {rand['top1_mean']:.2f} | "
          f"{rand['top1_mean'] - rand_direct['top1_mean']:+.2f} | |\n")

    eig_by_name = layer_sensitivities(model, val[:2], PowerIterationOptions(max_iterations=30, seed=seed))
    eig = list(eig_by_name.values())
    n = len(eig)
    print("Sub-net search (section 4.2): top-k by score against random assignments of the same total bits:\n")
    print(f"| average bits | top-{top_k} best | top-{top_k} mean | lowest-score {top_k} mean | random mean ({randoms}) "
          "| random best |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(seed)
    for avg in (2.5, 3.0, 3.5):
        top = [core.evaluate_fixed_bits(model, val, list(c.bits))["top1"] for c in top_k_by_average_bits(eig, (2, 3, 4), avg, top_k)]
        rnd = [core.evaluate_fixed_bits(model, val, list(b))["top1"]
               for b in sample_assignments_with_total(n, (2, 3, 4), avg, randoms, rng)]
        # the other end of the ranking (bits on the flat layers), to check which end the paper means
        low = [core.evaluate_fixed_bits(model, val, list(c.bits))["top1"]
               for c in top_k_by_average_bits([-v for v in eig], (2, 3, 4), avg, top_k)]
        print(f"| {avg} | {max(top):.2f} | {np.mean(top):.2f} | {np.mean(low):.2f} | {np.mean(rnd):.2f} | {max(rnd):.2f} |")
    print("\nPer-layer top Hessian eigenvalues: " + ", ".join(f"{k} {v:.3g}" for k, v in eig_by_name.items()) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--digits", action="store_true")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--random", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a busy machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs\n")
    switching(args.models, args.repeats)
    sizes(args.models[:1])
    if args.digits:
        digits_study(args.epochs, args.seed, args.top_k, args.random)
    return 0


if __name__ == "__main__":
    sys.exit(main())

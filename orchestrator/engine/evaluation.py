"""The paper's evaluation over a data-parallel validation set: each rank runs the core's protocol on its own
shard and the correct counts are summed with all_reduce before the division, so the figure covers the whole
validation set exactly once (the data room's ValLoader gives disjoint shards that cover it)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

import bitmixer_core as core


def all_reduce_sum(device: torch.device):
    """A `reduce` callable for bitmixer_core.evaluate_*: sums a counts tensor over all ranks."""
    def reduce(counts: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return counts
        moved = counts.to(device)  # gloo reduces CPU tensors, NCCL CUDA ones
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(counts.device)
    return reduce


def _cast(batches: Iterable, dtype: torch.dtype):
    """Re-iterable view of `batches` with images in the network's dtype (bf16 engines)."""
    class _View:
        def __iter__(self):
            for images, labels in batches:
                yield images.to(dtype), labels
    return _View()


def evaluate_stage(net: nn.Module, val_batches: Iterable, *, stage: str, bits: list[int], rand_seeds: list[int],
                   device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Flat metrics: top1_b<bits>/top5_b<bits> for every bit-width and rand_top{1,5}_{mean,std}; for the FP32
    stage only top1_fp32/top5_fp32. Also val_images, the number of images the figures cover."""
    reduce = all_reduce_sum(device)
    batches = _cast(val_batches, dtype)
    if stage == "fp32":
        result = core.evaluate_fixed_bits(net, batches, max(bits), reduce=reduce)
        return {"top1_fp32": result["top1"], "top5_fp32": result["top5"], "val_images": result["n"]}
    metrics: dict = {}
    for b in bits:
        result = core.evaluate_fixed_bits(net, batches, b, reduce=reduce)
        metrics[f"top1_b{b}"], metrics[f"top5_b{b}"] = result["top1"], result["top5"]
        metrics["val_images"] = result["n"]
    rand = core.evaluate_random_bits(net, batches, seeds=rand_seeds, reduce=reduce)
    for key in ("top1_mean", "top1_std", "top5_mean", "top5_std"):
        metrics[f"rand_{key}"] = rand[key]
    return metrics


def per_bit_table(metrics: dict, *, bits: list[int], stage: str, first_last: str, bits_weights: list[int]) -> dict:
    """The per-bit result table (columns for mlflow.log_table): one row per fixed bit-width, plus Rand."""
    if stage == "fp32":
        return {"bits": ["fp32"], "top1": [metrics["top1_fp32"]], "top5": [metrics["top5_fp32"]],
                "top1_std": [0.0], "first_last": [first_last]}
    rows = {"bits": [], "weight_bits": [], "top1": [], "top5": [], "top1_std": [], "first_last": []}
    for b, w in zip(bits, bits_weights):
        rows["bits"].append(f"A{b}/W{w}" if stage != "one" else f"A{b}/Wfp32")
        rows["weight_bits"].append(str(w) if stage != "one" else "fp32")
        rows["top1"].append(metrics[f"top1_b{b}"])
        rows["top5"].append(metrics[f"top5_b{b}"])
        rows["top1_std"].append(0.0)
        rows["first_last"].append(first_last)
    rows["bits"].append("Rand.")
    rows["weight_bits"].append("rand")
    rows["top1"].append(metrics["rand_top1_mean"])
    rows["top5"].append(metrics["rand_top5_mean"])
    rows["top1_std"].append(metrics["rand_top1_std"])
    rows["first_last"].append(first_last)
    return rows

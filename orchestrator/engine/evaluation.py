"""The paper's evaluation over a data-parallel validation set, and the names its figures go by.

Each rank runs the core's protocol on its own shard and the correct counts are summed with all_reduce before
the division, so the figure covers the whole validation set exactly once (the validation loader gives
disjoint shards that cover it).

Metric names are grouped so that the MLflow UI charts each group together: ``val/top1_<b>bit``,
``val/rand_top1_mean`` ... for evaluations, ``train/loss`` and ``train/lr`` for training, ``sys/epoch_time_s``
for the machine; all are logged with step = epoch. Ray's reported metrics carry the same ``val/`` names, plus
counters (epoch, global_step, resumed_at_epoch, subnet_draws) that stay out of MLflow.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

import bitmixer_core as core
from orchestrator.engine.precision import compute_precision

RAND_TOP1, RAND_TOP1_STD = "val/rand_top1_mean", "val/rand_top1_std"
RAND_TOP5, RAND_TOP5_STD = "val/rand_top5_mean", "val/rand_top5_std"
TOP1_FP32, TOP5_FP32 = "val/top1_fp32", "val/top5_fp32"
VAL_IMAGES = "val/images"
# Ray's reported name -> MLflow name of the training and machine figures (the worker reports these).
TRAINING_METRICS = {"train_loss": "train/loss", "lr": "train/lr", "epoch_time_s": "sys/epoch_time_s"}


HOLDOUT_PREFIX = "holdout/"  # the same figures on the held-out slice of the training set (sweep objective)


def as_holdout(metrics: dict) -> dict:
    """Figures of an evaluation on the held-out slice, renamed from val/... to holdout/..."""
    return {HOLDOUT_PREFIX + k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}


def top1_key(bits: int) -> str:
    """The metric name of top-1 (%) with every layer at `bits` bits."""
    return f"val/top1_{bits}bit"


def top5_key(bits: int) -> str:
    return f"val/top5_{bits}bit"


def tracked_metrics(metrics: dict, *, fixed_bits: int | None = None) -> dict[str, float]:
    """The epoch's figures as MLflow metrics: training ones renamed to their group, evaluations as they are,
    counters and lists left out. An Independent network (`fixed_bits`) keeps only its own bit-width."""
    out = {TRAINING_METRICS[k]: float(v) for k, v in metrics.items() if k in TRAINING_METRICS}
    for key, value in metrics.items():
        if not key.startswith(("val/", HOLDOUT_PREFIX)) or key.endswith("/images") or isinstance(value, (list, bool)):
            continue
        if fixed_bits is not None and key not in (top1_key(fixed_bits), top5_key(fixed_bits)):
            continue
        out[key] = float(value)
    return out


def all_reduce_sum(device: torch.device):
    """A `reduce` callable for bitmixer_core.evaluate_*: sums a counts tensor over all ranks."""
    def reduce(counts: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return counts
        moved = counts.to(device)  # gloo reduces CPU tensors, NCCL CUDA ones
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.to(counts.device)
    return reduce


def evaluate_stage(net: nn.Module, val_batches: Iterable, *, stage: str, bits: list[int], rand_seeds: list[int],
                   device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Flat metrics: val/top1_<b>bit and val/top5_<b>bit for every bit-width and val/rand_top{1,5}_{mean,std};
    for the FP32 stage only val/top1_fp32 and val/top5_fp32. Also val/images, the number of images the
    figures cover. The forward passes compute in `dtype`, the stage's training precision."""
    with compute_precision(device, dtype):
        return _evaluate_stage(net, val_batches, stage=stage, bits=bits, rand_seeds=rand_seeds,
                               reduce=all_reduce_sum(device))


def _evaluate_stage(net: nn.Module, batches: Iterable, *, stage: str, bits: list[int], rand_seeds: list[int],
                    reduce) -> dict:
    if stage == "fp32":
        result = core.evaluate_fixed_bits(net, batches, max(bits), reduce=reduce)
        return {TOP1_FP32: result["top1"], TOP5_FP32: result["top5"], VAL_IMAGES: result["n"]}
    metrics: dict = {}
    for b in bits:
        result = core.evaluate_fixed_bits(net, batches, b, reduce=reduce)
        metrics[top1_key(b)], metrics[top5_key(b)] = result["top1"], result["top5"]
        metrics[VAL_IMAGES] = result["n"]
    rand = core.evaluate_random_bits(net, batches, seeds=rand_seeds, reduce=reduce)
    for key, name in (("top1_mean", RAND_TOP1), ("top1_std", RAND_TOP1_STD), ("top5_mean", RAND_TOP5),
                      ("top5_std", RAND_TOP5_STD)):
        metrics[name] = rand[key]
    return metrics


def per_bit_table(metrics: dict, *, bits: list[int], stage: str, first_last: str, bits_weights: list[int]) -> dict:
    """The per-bit result table (columns for mlflow.log_table): one row per fixed bit-width, plus Rand."""
    if stage == "fp32":
        return {"bits": ["fp32"], "top1": [metrics[TOP1_FP32]], "top5": [metrics[TOP5_FP32]],
                "top1_std": [0.0], "first_last": [first_last]}
    rows = {"bits": [], "weight_bits": [], "top1": [], "top5": [], "top1_std": [], "first_last": []}
    for b, w in zip(bits, bits_weights):
        rows["bits"].append(f"A{b}/W{w}" if stage != "one" else f"A{b}/Wfp32")
        rows["weight_bits"].append(str(w) if stage != "one" else "fp32")
        rows["top1"].append(metrics[top1_key(b)])
        rows["top5"].append(metrics[top5_key(b)])
        rows["top1_std"].append(0.0)
        rows["first_last"].append(first_last)
    rows["bits"].append("Rand.")
    rows["weight_bits"].append("rand")
    rows["top1"].append(metrics[RAND_TOP1])
    rows["top5"].append(metrics[RAND_TOP5])
    rows["top1_std"].append(metrics[RAND_TOP1_STD])
    rows["first_last"].append(first_last)
    return rows


def own_bit_rows(table: dict, fixed_bits: int) -> dict:
    """The rows of a per-bit table that an Independent network at `fixed_bits` bits trained for."""
    keep = [i for i, label in enumerate(table["bits"]) if label.startswith(f"A{fixed_bits}/")]
    return {column: [values[i] for i in keep] for column, values in table.items()}

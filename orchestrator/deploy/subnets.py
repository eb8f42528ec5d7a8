"""Sub-net search on a trained meta-network: sensitivities, top-k candidates per budget, their accuracy.

For every average-bits budget: the top-k assignments by the paper's score (``bitmixer_core.subnet_search``)
and ``random_per_budget`` uniform random assignments of exactly the same total bits, all evaluated. For
every BitOPs budget (a fraction of the all-max-bits BitOPs): the top-k under that budget. The fixed
bit-widths are evaluated as reference points for the plots.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

import bitmixer_core as core
from bitmixer_core.sensitivity import PowerIterationOptions, layer_sensitivities
from bitmixer_core.subnet_search import (
    assignment_bitops,
    assignment_score,
    layer_macs,
    sample_assignments_with_total,
    top_k_by_average_bits,
    top_k_by_bitops,
)

from .config import SearchConfig


@dataclass
class EvaluatedSubnet:
    kind: str          # "top" (search), "random" (same budget), "fixed" (all layers alike)
    budget: str        # "avg_bits=2.5", "bitops<=0.5", or "fixed"
    rank: int          # 0 = best-scoring candidate of its budget; random draws count from 0 too
    bits: tuple[int, ...]
    average_bits: float
    bitops: int
    score: float
    top1: float
    top5: float


@dataclass
class SubnetSearchReport:
    layer_names: list[str]
    eigenvalues: list[float]
    macs: list[int]
    subnets: list[EvaluatedSubnet] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return [{**asdict(s), "bits": list(s.bits)} for s in self.subnets]

    def summary(self) -> dict[str, float]:
        """Per budget: best top-1 of the top-k, mean top-1 of the random draws (the note's comparison)."""
        out: dict[str, float] = {}
        for budget in dict.fromkeys(s.budget for s in self.subnets):
            for kind in ("top", "random"):
                top1 = [s.top1 for s in self.subnets if s.budget == budget and s.kind == kind]
                if top1:
                    out[f"{budget}/{kind}_best_top1"] = max(top1)
                    out[f"{budget}/{kind}_mean_top1"] = float(np.mean(top1))
        return out


def find_subnets(model: nn.Module, sensitivity_batches: Sequence, eval_batches: Sequence,
                 cfg: SearchConfig) -> SubnetSearchReport:
    layers = core.quantized_layers(model)
    names = [n for n, _ in layers]
    bit_set = layers[0][1].bit_widths
    weight_bits_of = dict(zip(bit_set.activations, bit_set.weights))
    choices = list(bit_set.activations)
    options = PowerIterationOptions(max_iterations=cfg.max_iterations, tolerance=cfg.tolerance, seed=cfg.seed)
    sens = layer_sensitivities(model, list(sensitivity_batches)[: cfg.sensitivity_batches], options)
    eig = [sens[n] for n in names]
    example = next(iter(eval_batches))[0]
    macs_by_name = layer_macs(model, example)
    macs = [macs_by_name[n] for n in names]
    report = SubnetSearchReport(names, eig, macs)

    def evaluate(kind: str, budget: str, rank: int, bits: tuple[int, ...]) -> None:
        result = core.evaluate_fixed_bits(model, eval_batches, list(bits))
        report.subnets.append(EvaluatedSubnet(
            kind, budget, rank, tuple(bits), sum(bits) / len(bits), assignment_bitops(bits, macs, weight_bits_of),
            assignment_score(bits, eig), result["top1"], result["top5"]))

    for b in choices:
        evaluate("fixed", "fixed", 0, (b,) * len(names))
    generator = np.random.default_rng(cfg.seed)
    for avg in cfg.average_bits:
        budget = f"avg_bits={avg:g}"
        for rank, cand in enumerate(top_k_by_average_bits(eig, choices, avg, cfg.top_k)):
            evaluate("top", budget, rank, cand.bits)
        for rank, bits in enumerate(sample_assignments_with_total(len(names), choices, avg, cfg.random_per_budget,
                                                                   generator)):
            evaluate("random", budget, rank, bits)
    full = assignment_bitops((choices[-1],) * len(names), macs, weight_bits_of)
    for fraction in cfg.bitops_fractions:
        budget = f"bitops<={fraction:g}"
        for rank, cand in enumerate(top_k_by_bitops(eig, macs, weight_bits_of, int(fraction * full), cfg.top_k)):
            evaluate("top", budget, rank, cand.bits)
    return report


def materialize(batches, limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copy batches out of a loader that reuses its buffers (FFCV), so they can be iterated many times."""
    out = []
    for i, (images, labels) in enumerate(batches):
        if limit is not None and i >= limit:
            break
        out.append((images.detach().clone().cpu(), labels.detach().clone().cpu()))
    return out

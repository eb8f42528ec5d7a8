"""Sub-net search (paper section 4.2): the best bit assignments for a budget, found exactly.

Every quantized layer i has a sensitivity v_i (the top Hessian eigenvalue, see ``sensitivity.py``) and
picks a bit-width b_i from a small set. The paper ranks the assignments of total bit-cost
C = round(N * b_avg) by the score sum_i b_i * v_i.

Which end of that ranking is "best"? Section 4.2: small eigenvalues mean a flat loss surface, so those
layers are the candidates for aggressive quantization; the bits should go to the layers with large
eigenvalues. For a fixed total, moving a bit from a flat layer to a sharp one *raises* sum b_i * v_i,
so the best assignment is the one with the **highest** score. (The paper also notes that the better
sub-nets put more bits in the upper part of the network, where Fig. 5 shows the larger eigenvalues.)

The set of assignments is exponential (|bits|^N), so nothing here enumerates it:
- ``top_k_by_average_bits``: dynamic programme over (layer, cost so far) keeping the k best partial
  assignments per cost; exact because extending two prefixes by the same suffix keeps their order.
- ``top_k_by_bitops``: the device-aware budget the paper suggests, sum_i MACs_i * w_i * a_i <= B.
  BitOPs are large and irregular, so instead of a table per cost we keep, per layer, only the prefixes
  that fewer than k other prefixes beat while costing no more ("k-dominance"); also exact.
- ``sample_assignments_with_total``: uniform random assignments of exactly the same total bits (the
  paper's baseline population), drawn by counting completions, with no rejection.

Ties in score are broken by the bit tuple (lexicographically smaller first), so results are deterministic
and equal to sorting the brute-force list by ``(-score, bits)``.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "layer_macs",
    "RankedAssignment",
    "total_bits_for_average",
    "assignment_score",
    "assignment_bitops",
    "top_k_by_average_bits",
    "top_k_by_bitops",
    "sample_assignments_with_total",
    "brute_force_top_k",
]


@dataclass(frozen=True)
class RankedAssignment:
    """One candidate sub-net: per-layer bit-widths (forward order) and its ranking score."""

    bits: tuple[int, ...]
    score: float

    @property
    def average_bits(self) -> float:
        return sum(self.bits) / len(self.bits)


def total_bits_for_average(num_layers: int, average_bits: float) -> int:
    """C_bits = round(N * b_avg), rounding halves up as the paper's [.] does."""
    return int(math.floor(num_layers * average_bits + 0.5))


def assignment_score(bits: Sequence[int], eigenvalues: Sequence[float]) -> float:
    """The paper's ranking cost C_total = [b_0 ... b_N] . v_C (higher is better, see module doc)."""
    return float(sum(b * v for b, v in zip(bits, eigenvalues)))


def assignment_bitops(bits: Sequence[int], macs: Sequence[int], weight_bits_of: dict[int, int]) -> int:
    """BitOPs of an assignment: sum of MACs * weight bits * activation bits over the quantized layers."""
    return int(sum(m * weight_bits_of[b] * b for b, m in zip(bits, macs)))


@torch.no_grad()
def layer_macs(model: nn.Module, images: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each switchable quantized layer (forward order), measured with
    hooks on one forward pass of ``images`` (the input size decides the convolutions' output sizes)."""
    from .assignment import quantized_layers

    macs: dict[str, int] = {}
    hooks = []
    for name, layer in quantized_layers(model):
        def hook(module, inputs, output, name=name):
            per_output = module.weight[0].numel()  # (in_channels / groups) * kernel area, or in_features
            macs[name] = int(output[0].numel() * per_output)
        hooks.append(layer.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(images[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: macs[name] for name, _ in quantized_layers(model)}


def _check_inputs(eigenvalues: Sequence[float], bit_choices: Sequence[int], k: int) -> tuple[list[float], list[int]]:
    eig = [float(v) for v in eigenvalues]
    if not eig:
        raise ValueError("eigenvalues is empty: pass one sensitivity per quantized layer.")
    if not all(math.isfinite(v) for v in eig):
        raise ValueError("eigenvalues contain NaN or infinity: recompute the layer sensitivities.")
    choices = sorted(set(int(b) for b in bit_choices))
    if not choices or choices[0] < 1:
        raise ValueError(f"bit_choices {list(bit_choices)} must be positive bit-widths, e.g. (2, 3, 4).")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1.")
    return eig, choices


# A partial assignment is (order_key, bits) where order_key = (-score, bits) sorts best first.
def _merge_best(candidates: list[tuple[float, tuple[int, ...]]], k: int) -> list[tuple[float, tuple[int, ...]]]:
    return heapq.nsmallest(k, candidates, key=lambda item: (-item[0], item[1]))


def top_k_by_average_bits(
    eigenvalues: Sequence[float], bit_choices: Sequence[int], average_bits: float, k: int
) -> list[RankedAssignment]:
    """The k highest-scoring assignments whose bits sum to round(N * average_bits), best first.

    Fewer than k are returned only when fewer exist. Cost O(N * C * |bits| * k log k), with C <= N * max(bits).
    """
    eig, choices = _check_inputs(eigenvalues, bit_choices, k)
    n = len(eig)
    total = total_bits_for_average(n, average_bits)
    if not n * choices[0] <= total <= n * choices[-1]:
        raise ValueError(
            f"average_bits={average_bits} gives a total of {total} bits over {n} layers, outside what bits "
            f"{choices} can reach ({n * choices[0]}..{n * choices[-1]}): choose an average between "
            f"{choices[0]} and {choices[-1]}."
        )
    # best[c] = the k best (score, bits) prefixes of the layers seen so far that cost exactly c bits.
    best: dict[int, list[tuple[float, tuple[int, ...]]]] = {0: [(0.0, ())]}
    for i, v in enumerate(eig):
        remaining_after = n - i - 1
        step: dict[int, list[tuple[float, tuple[int, ...]]]] = {}
        for cost, prefixes in best.items():
            for b in choices:
                c = cost + b
                # prune costs from which the total can no longer be reached exactly
                if c + remaining_after * choices[0] > total or c + remaining_after * choices[-1] < total:
                    continue
                step.setdefault(c, []).extend((s + b * v, bits + (b,)) for s, bits in prefixes)
        best = {c: _merge_best(cands, k) for c, cands in step.items()}
    return [RankedAssignment(bits=bits, score=assignment_score(bits, eig)) for _, bits in best.get(total, [])]


def top_k_by_bitops(
    eigenvalues: Sequence[float],
    macs: Sequence[int],
    weight_bits_of: dict[int, int],
    bitops_budget: int,
    k: int,
) -> list[RankedAssignment]:
    """The k highest-scoring assignments with BitOPs <= bitops_budget, best first.

    ``weight_bits_of`` maps a layer's (activation) bit-width to its weight bit-width, e.g. {2: 1, 3: 3, 4: 4}.
    A prefix is dropped only when k other prefixes of the same layers cost no more BitOPs and rank
    better: every completion of it is then beaten by k feasible completions, so the result stays exact.
    """
    eig, choices = _check_inputs(eigenvalues, list(weight_bits_of), k)
    if len(macs) != len(eig):
        raise ValueError(f"macs has {len(macs)} entries but there are {len(eig)} eigenvalues: pass one per layer.")
    n = len(eig)
    layer_cost = [[int(m) * weight_bits_of[b] * b for b in choices] for m in macs]
    cheapest_suffix = np.concatenate([np.cumsum([min(c) for c in layer_cost][::-1])[::-1], [0]])
    if cheapest_suffix[0] > bitops_budget:
        raise ValueError(
            f"bitops_budget={bitops_budget} is below the cheapest assignment ({int(cheapest_suffix[0])} BitOPs): "
            "raise the budget."
        )
    # states: (bitops, score, bits)
    states: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for i, v in enumerate(eig):
        grown = [
            (ops + cost, s + b * v, bits + (b,))
            for ops, s, bits in states
            for b, cost in zip(choices, layer_cost[i])
            if ops + cost + cheapest_suffix[i + 1] <= bitops_budget
        ]
        states = _k_dominance_filter(grown, k)
    ranked = sorted(states, key=lambda st: (-st[1], st[2]))[:k]
    return [RankedAssignment(bits=bits, score=assignment_score(bits, eig)) for _, _, bits in ranked]


def _k_dominance_filter(states: list[tuple[int, float, tuple[int, ...]]], k: int) -> list[tuple[int, float, tuple[int, ...]]]:
    """Keep the states that fewer than k cheaper-or-equal states outrank."""
    # Sweep by BitOPs ascending; among equal BitOPs the better-ranked first, so every state already seen
    # costs no more than the current one. A max-heap of size k holds the k best ranks seen so far.
    states = sorted(states, key=lambda st: (st[0], -st[1], st[2]))
    kept = []
    worst_of_best: list[tuple[float, tuple]] = []  # heap of (score, negated bits) -> smallest = worst rank
    for st in states:
        rank_key = (st[1], tuple(-b for b in st[2]))
        if len(worst_of_best) < k:
            kept.append(st)
            heapq.heappush(worst_of_best, rank_key)
        elif rank_key > worst_of_best[0]:
            kept.append(st)
            heapq.heapreplace(worst_of_best, rank_key)
    return kept


def sample_assignments_with_total(
    num_layers: int, bit_choices: Sequence[int], average_bits: float, count: int, generator: np.random.Generator
) -> list[tuple[int, ...]]:
    """``count`` assignments drawn uniformly from all those whose bits sum to round(N * average_bits)."""
    choices = sorted(set(int(b) for b in bit_choices))
    total = total_bits_for_average(num_layers, average_bits)
    # ways[i][c] = number of ways layers i..N-1 can sum to c (Python ints: no overflow)
    ways = [dict() for _ in range(num_layers + 1)]
    ways[num_layers] = {0: 1}
    for i in range(num_layers - 1, -1, -1):
        for c_rest, w in ways[i + 1].items():
            for b in choices:
                ways[i][c_rest + b] = ways[i].get(c_rest + b, 0) + w
    if ways[0].get(total, 0) == 0:
        raise ValueError(f"no assignment of {num_layers} layers with bits {choices} averages {average_bits}.")
    samples = []
    for _ in range(count):
        bits, left = [], total
        for i in range(num_layers):
            weights = [ways[i + 1].get(left - b, 0) for b in choices]
            pick = _draw_weighted(weights, generator)
            bits.append(choices[pick])
            left -= choices[pick]
        samples.append(tuple(bits))
    return samples


def _draw_weighted(weights: list[int], generator: np.random.Generator) -> int:
    # exact integer weights can exceed float range for deep nets; draw on their ratio in float64
    total = sum(weights)
    u = generator.random() * total
    acc = 0
    for idx, w in enumerate(weights):
        acc += w
        if w and u < acc:
            return idx
    return max(i for i, w in enumerate(weights) if w)


def brute_force_top_k(
    eigenvalues: Sequence[float], bit_choices: Sequence[int], k: int, *, total_bits: int | None = None,
    macs: Sequence[int] | None = None, weight_bits_of: dict[int, int] | None = None, bitops_budget: int | None = None,
) -> list[RankedAssignment]:
    """Reference by full enumeration (tests only; |bits|^N assignments)."""
    import itertools

    eig = [float(v) for v in eigenvalues]
    found = []
    for bits in itertools.product(sorted(set(bit_choices)), repeat=len(eig)):
        if total_bits is not None and sum(bits) != total_bits:
            continue
        if bitops_budget is not None and assignment_bitops(bits, macs, weight_bits_of) > bitops_budget:
            continue
        found.append((assignment_score(bits, eig), bits))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [RankedAssignment(bits=b, score=s) for s, b in found[:k]]

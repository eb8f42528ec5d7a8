"""The paper's evaluation protocol (section 4): top-1/top-5 with every layer at one fixed bit-width, and
"Rand.": every layer's bit-width redrawn at every batch, over a few seeds, mean and std.

Accuracies are percentages (0-100), as in the paper's tables. Correct counts are summed in a float64
tensor that goes through `reduce` before the division (the engine passes an all-reduce, so the figure
covers the whole validation set across ranks)."""

from __future__ import annotations

import statistics
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .assignment import get_bits, quantized_layers, refresh_transitions, set_bits


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return torch.stack([hits[:, :1].any(1).sum(), hits.any(1).sum(), torch.tensor(labels.numel(), device=labels.device)]).to(torch.float64)


def _run(model, batches, before_batch) -> torch.Tensor:
    counts = None
    with torch.no_grad():
        for images, labels in batches:
            before_batch()
            c = _count_correct(model(images), labels)
            counts = c if counts is None else counts + c
    if counts is None:
        device = next(model.parameters()).device
        counts = torch.zeros(3, dtype=torch.float64, device=device)
    return counts


def _accuracies(counts: torch.Tensor) -> dict:
    top1, top5, n = counts.tolist()
    if n == 0:
        raise ValueError("the validation batches held no examples; pass a non-empty, re-iterable loader or list.")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "n": int(n)}


class _Restore:
    """Put the model in eval mode; restore its mode and bit assignment afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = self.model.training
        self.bits = get_bits(self.model)
        self.model.eval()

    def __exit__(self, *exc):
        set_bits(self.model, self.bits)
        refresh_transitions(self.model)
        self.model.train(self.training)


def evaluate_fixed_bits(model: nn.Module, batches: Iterable, bits,
                        reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> dict:
    """Top-1/top-5 (%) with the assignment `bits` (an int for every layer, or any set_bits spec)."""
    with _Restore(model):
        set_bits(model, bits)
        return _accuracies(reduce(_run(model, batches, lambda: None)))


def evaluate_random_bits(model: nn.Module, batches: Iterable, seeds: Sequence[int] = (0, 1, 2),
                         reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> dict:
    """"Rand.": for each seed, every layer draws its bit-width uniformly from its own set at every batch
    (generator seeded by the seed, so every rank draws alike); mean and std (sample, 0 for one seed) over
    seeds. `batches` is iterated once per seed, so it must be re-iterable."""
    if not seeds:
        raise ValueError("evaluate_random_bits needs at least one seed.")
    layers = quantized_layers(model)
    per_seed = []
    with _Restore(model):
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))

            def redraw():
                set_bits(model, [
                    m.bit_widths.activations[int(torch.randint(len(m.bit_widths), (), generator=generator))]
                    for _, m in layers
                ])

            per_seed.append(_accuracies(reduce(_run(model, batches, redraw))))
    top1 = [r["top1"] for r in per_seed]
    top5 = [r["top5"] for r in per_seed]
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    return {
        "top1_mean": statistics.fmean(top1), "top1_std": std(top1),
        "top5_mean": statistics.fmean(top5), "top5_std": std(top5),
        "top1_per_seed": top1, "top5_per_seed": top5, "seeds": list(seeds), "n": per_seed[0]["n"],
    }

"""Layer sensitivity for the sub-net search (paper section 4.2, following HAWQ [11]).

The sensitivity of a quantized layer is the top eigenvalue of the Hessian of the loss with respect to that
layer's weights, with the network at its highest bit-width. Forming the Hessian is out of the question,
so it is found by power iteration [31] with Hessian-vector products (Pearlmutter's trick: H v is the
gradient of (grad L . v)), averaged over a few batches.

One forward pass and one first-order backward (kept as a graph) per batch serve every layer at once;
each layer then needs only its own second-order backward. Layers iterate until their eigenvalue estimate
changes by less than ``tolerance`` (relative) or ``max_iterations`` is reached.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .assignment import get_bits, quantized_layers, refresh_transitions, set_bits

__all__ = ["PowerIterationOptions", "top_hessian_eigenvalues", "layer_sensitivities"]


@dataclass(frozen=True)
class PowerIterationOptions:
    """Stopping rule and random start of the power iteration."""

    max_iterations: int = 50
    tolerance: float = 1e-3  # relative change of the eigenvalue estimate between two iterations
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.max_iterations, bool) or not isinstance(self.max_iterations, int) or self.max_iterations < 1:
            raise ValueError(f"max_iterations must be a positive integer, got {self.max_iterations!r}.")
        if not (isinstance(self.tolerance, (int, float)) and self.tolerance > 0):
            raise ValueError(f"tolerance must be a positive number, got {self.tolerance!r}.")


def _normalised(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-30)


def top_hessian_eigenvalues(
    loss_of_batch: Callable[[object], torch.Tensor],
    batches: Sequence,
    params: Sequence[torch.Tensor],
    options: PowerIterationOptions = PowerIterationOptions(),
) -> list[float]:
    """Top (largest in magnitude) eigenvalue of the Hessian block of each parameter tensor in ``params``.

    ``loss_of_batch(batch)`` returns a scalar loss; the Hessian is that of the mean loss over ``batches``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: pass at least one (images, labels) batch for the Hessian.")
    generator = torch.Generator().manual_seed(int(options.seed))
    vectors = [_normalised(torch.randn(p.shape, generator=generator).to(p)) for p in params]
    estimates: list[float | None] = [None] * len(params)
    active = list(range(len(params)))
    for _ in range(options.max_iterations):
        products = [torch.zeros_like(p) for p in params]
        for batch in batches:
            loss = loss_of_batch(batch)
            grads = torch.autograd.grad(loss, list(params), create_graph=True)
            for position, i in enumerate(active):
                last = position == len(active) - 1
                (hv,) = torch.autograd.grad((grads[i] * vectors[i]).sum(), params[i], retain_graph=not last)
                products[i] += hv.detach() / len(batches)
        still = []
        for i in active:
            eigenvalue = float((products[i] * vectors[i]).sum())  # Rayleigh quotient v^T H v, |v| = 1
            previous = estimates[i]
            estimates[i] = eigenvalue
            vectors[i] = _normalised(products[i])
            if previous is None or abs(eigenvalue - previous) > options.tolerance * max(abs(previous), 1e-12):
                still.append(i)
        active = still
        if not active:
            break
    return [float(e) for e in estimates]


def layer_sensitivities(
    model: nn.Module,
    batches: Iterable,
    options: PowerIterationOptions = PowerIterationOptions(),
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> dict[str, float]:
    """Top Hessian eigenvalue of the loss w.r.t. each switchable quantized layer's weights (forward order),
    with every layer at its highest bit-width and BNs on their running statistics (eval mode).
    The model's mode, bit assignment and gradients are left as they were."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("the model has no switchable quantized layers to measure.")
    saved_bits, was_training = get_bits(model), model.training
    device = next(model.parameters()).device
    try:
        set_bits(model, {name: layer.bit_widths.activations[-1] for name, layer in layers})
        model.eval()

        def loss_of_batch(batch):
            images, labels = batch
            return loss(model(images.to(device)), labels.to(device))

        values = top_hessian_eigenvalues(loss_of_batch, list(batches), [m.weight for _, m in layers], options)
    finally:
        set_bits(model, saved_bits)
        refresh_transitions(model)
        model.train(was_training)
    return {name: value for (name, _), value in zip(layers, values)}

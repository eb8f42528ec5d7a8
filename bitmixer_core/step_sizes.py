"""Data-driven (LSQ) initialisation of the step sizes of a whole model."""

from __future__ import annotations

import torch
from torch import nn

from .assignment import get_bits, quantized_layers, refresh_transitions, set_bits
from .layers import QuantizedLayerMixin
from .transitional_bn import TransitionalBatchNorm2d


@torch.no_grad()
def reinitialize_weight_step_sizes(model: nn.Module) -> None:
    """2 * mean|W| / sqrt(m_b) from the current weights, for every layer and weight bit-width
    (Stage II starts from Stage I's real-valued weights, whose scale has moved since construction)."""
    for m in model.modules():
        if isinstance(m, QuantizedLayerMixin):
            m.reset_weight_step_sizes()


@torch.no_grad()
def calibrate_activation_step_sizes(model: nn.Module, images: torch.Tensor) -> None:
    """Initialise every activation step size from one batch: one forward per bit-width, all layers at
    that bit-width, each layer seeing the input the quantized layers before it produce.

    BNs use batch statistics (train mode) but their running statistics are left untouched (momentum 0),
    and the model's mode, bit assignment and quantization switches are restored afterwards. Call it on
    every rank before wrapping the model for data parallelism, so that rank 0's values are broadcast."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayerMixin)]
    if not layers:
        return
    was_training = model.training
    saved_bits = get_bits(model)
    saved_activations = [m.quantize_activations for m in layers]
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, TransitionalBatchNorm2d))]
    saved_momentum = [bn.momentum for bn in norms]
    saved_tracked = [bn.num_batches_tracked.clone() for bn in norms if bn.num_batches_tracked is not None]
    try:
        model.train()
        for bn in norms:
            bn.momentum = 0.0
        for m in layers:
            m.quantize_activations = True
            m._calibrating = True
        rank_count = max((len(m.bit_widths) for _, m in quantized_layers(model)), default=1)
        for rank in range(rank_count):
            plan = {n: m.bit_widths.activations[min(rank, len(m.bit_widths) - 1)] for n, m in quantized_layers(model)}
            set_bits(model, plan)
            model(images)
            for m in layers:
                if not m.switchable:
                    m._calibrating = False  # fixed layers have one bit-width: calibrate them once
    finally:
        for m, act in zip(layers, saved_activations):
            m.quantize_activations = act
            m._calibrating = False
        for bn, momentum in zip(norms, saved_momentum):
            bn.momentum = momentum
        for bn, tracked in zip([bn for bn in norms if bn.num_batches_tracked is not None], saved_tracked):
            bn.num_batches_tracked.copy_(tracked)
        set_bits(model, saved_bits)
        refresh_transitions(model)
        model.train(was_training)

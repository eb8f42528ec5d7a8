"""Bit-switchable layers: per-bit step sizes, Stage I, data-driven initialisation, bit sets."""

import math

import pytest
import torch

from bitmixer_core import (BitAssignment, BitWidths, QConv2d, QLinear, apply_assignment, build_model,
                           calibrate_activation_step_sizes, get_bits, quantized_layers, reinitialize_weight_step_sizes,
                           set_quantization)


def test_bitwidths_are_validated():
    """Bit sets must be sorted unique integers in 1..8 and weights/activations equally long."""
    assert BitWidths(weights=(1, 3, 4), activations=(2, 3, 4)).weight_bits(2) == 1
    with pytest.raises(ValueError, match="sorted and unique"):
        BitWidths.same((4, 2))
    with pytest.raises(ValueError, match="from 1 to 8"):
        BitWidths.same((2, 9))
    with pytest.raises(ValueError, match="as many bit-widths"):
        BitWidths(weights=(2, 3), activations=(2, 3, 4))
    assert BitWidths.coerce([2, 3, 4]) == BitWidths.same((2, 3, 4))
    assert BitWidths.coerce({"weights": [1, 3, 4], "activations": [2, 3, 4]}).weights == (1, 3, 4)


def test_step_sizes_are_parameters_one_per_bit_width_initialised_from_weights():
    """weight_step_size / activation_step_size are parameters, one entry per bit-width; weight ones are
    2 mean|W| / sqrt(m_b) at construction (m = 1 for binary)."""
    layer = QConv2d(4, 8, 3, padding=1, bits=BitWidths(weights=(1, 3, 4), activations=(2, 3, 4)))
    names = dict(layer.named_parameters())
    assert names["weight_step_size"].shape == (3,) and names["activation_step_size"].shape == (3,)
    mean_abs = layer.weight.detach().abs().mean().item()
    expected = [2 * mean_abs / math.sqrt(m) for m in (1, 3, 7)]
    assert layer.weight_step_size.tolist() == pytest.approx(expected, rel=1e-5)


def test_activation_step_initialised_from_first_training_batch_only():
    """The first training batch at a bit-width sets its activation step size; later batches do not."""
    layer = QLinear(16, 4)
    layer.train()
    x = torch.randn(32, 16)
    layer(x)
    i = layer.bit_widths.index(layer.bits)
    assert bool(layer.activation_step_initialized[i])
    assert layer.activation_step_size[i].item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)
    layer(x * 100)
    assert layer.activation_step_size[i].item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)
    assert "activation_step_initialized" in layer.state_dict()


def test_calibration_initialises_every_bit_width_and_restores_the_model(tiny):
    """calibrate_activation_step_sizes fills every activation step size and leaves mode, bits and BN
    running statistics as they were."""
    _, images = tiny
    model = build_model("resnet_tiny", num_classes=10, stem="small", first_last="int8")
    model.eval()
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    before = get_bits(model)
    calibrate_activation_step_sizes(model, images)
    for name, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "activation_step_initialized")]:
        assert bool(layer.activation_step_initialized.all()), name
    assert not model.training and get_bits(model) == before
    for k, v in model.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, running[k])


def test_stage_one_leaves_weights_real(tiny):
    """Stage I: the conv uses its real-valued weights (no weight step-size gradient), activations quantized."""
    model, images = tiny
    apply_assignment(model, BitAssignment(bits=(2,) * len(quantized_layers(model)), quantize_weights=False))
    _, layer = quantized_layers(model)[0]
    assert layer.quantized_weight() is layer.weight
    model(images).sum().backward()
    assert layer.weight_step_size.grad is None or not layer.weight_step_size.grad.any()
    assert layer.activation_step_size.grad is not None and layer.activation_step_size.grad.abs().sum() > 0
    set_quantization(model, weights=True, activations=True)
    w = layer.quantized_weight().detach()
    levels = w / layer.weight_step_size[layer.bit_widths.index(layer.bits)].detach()
    torch.testing.assert_close(levels, levels.round())


def test_reinitialize_weight_step_sizes_follows_current_weights():
    """Stage II start: weight step sizes are recomputed from the (changed) real weights."""
    layer = QLinear(8, 8)
    with torch.no_grad():
        layer.weight.mul_(10)
    reinitialize_weight_step_sizes(layer)
    assert layer.weight_step_size[-1].item() == pytest.approx(2 * layer.weight.abs().mean().item() / math.sqrt(7), rel=1e-5)


def test_clip_nesting_layers_share_the_largest_bit_widths_step_size():
    """nesting="clip" (Eq. 3-4): every bit-width uses the max bit-width's alpha; lower bits clip its grid."""
    layer = QLinear(16, 4, quantizer={"nesting": "clip"})
    layer.train()
    x = torch.randn(8, 16)
    layer(x)
    assert bool(layer.activation_step_initialized.all())
    layer.set_bit_width(2)
    alpha = layer.activation_step_size[-1].detach()
    levels = layer.quantized_input(x).detach() / alpha
    assert set(torch.unique(levels).round().tolist()) <= {-1.0, 0.0, 1.0}

"""Every activation quantizer sees a tensor its range can represent (section 3.1, footnote 1).

Eq. 2's symmetric range wastes half its states on a post-ReLU input, and turns 1 bit into the constant
sign(x) = +1. These tests count the integer states each quantized layer actually uses on a calibrated
ResNet-18, in both block orders."""

import pytest
import torch

from bitmixer_core import (TransitionalBatchNorm2d, build_model, calibrate_activation_step_sizes, quantized_layers,
                           set_bits)


def quantized_inputs(model, images):
    """{layer name: its quantized input divided by its step size (the integer states)}."""
    seen, hooks = {}, []
    for name, layer in quantized_layers(model):
        def keep(module, args, name=name):
            alpha = module.activation_step_size[module.bit_widths.index(module.bits)]
            seen[name] = (module.quantized_input(args[0]) / alpha).detach()
        hooks.append(layer.register_forward_pre_hook(keep))
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return seen


def calibrate(model, images):
    """Step sizes from the batch (LSQ init), then BN running statistics of every uniform entry from it
    (a cumulative average over one train-mode pass per bit-width), then eval mode."""
    calibrate_activation_step_sizes(model, images)
    model.train()
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, TransitionalBatchNorm2d)):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for bits in quantized_layers(model)[0][1].bit_widths.activations:
            set_bits(model, bits)
            model(images)
    model.eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(8, 3, 64, 64)


@pytest.mark.parametrize("block_order", ["bn_quantize_conv", "conv_bn_relu"])
def test_two_bit_activations_use_at_least_three_states_in_every_layer(images, block_order):
    """At 2 bits every quantized layer of a calibrated ResNet-18 uses at least 3 integer states (Eq. 2's
    ternary {-1, 0, 1} on signed inputs, [0, 3] on post-ReLU ones), none holding over 95 % of values."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, block_order=block_order)
    calibrate(model, images)
    set_bits(model, 2)
    for name, states in quantized_inputs(model, images).items():
        values, counts = torch.unique(states.round(), return_counts=True)
        assert len(values) >= 3, (name, values.tolist())
        assert counts.max() / counts.sum() < 0.95, (name, values.tolist(), counts.tolist())


@pytest.mark.parametrize("block_order", ["bn_quantize_conv", "conv_bn_relu"])
def test_one_bit_layers_depend_on_their_input(images, block_order):
    """With bits {1, 2, 3, 4} at 1 bit, every layer's quantized input takes two values, so its output
    depends on its input (sign(x) of a never-negative tensor would be a constant)."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, bits=[1, 2, 3, 4], block_order=block_order)
    calibrate(model, images)
    set_bits(model, 1)
    for name, states in quantized_inputs(model, images).items():
        values, counts = torch.unique(states.round(), return_counts=True)
        assert len(values) == 2 and counts.min() / counts.sum() > 0.02, (name, values.tolist(), counts.tolist())
    layer = dict(quantized_layers(model))["layer3.0.conv1"]
    x = torch.randn(2, layer.in_channels, 8, 8)
    assert not torch.equal(layer(x), layer(-x))


def test_unsigned_range_exactly_where_the_input_follows_a_relu():
    """The classic order (the default) declares its post-ReLU inputs unsigned; BN first feeds every
    switchable quantizer a signed tensor (Eq. 2 as written)."""
    classic = build_model("resnet_tiny", num_classes=10, stem="small")
    assert not any(layer.signed_input for _, layer in quantized_layers(classic))
    norm_first = build_model("resnet_tiny", num_classes=10, stem="small", block_order="bn_quantize_conv")
    assert all(layer.signed_input for _, layer in quantized_layers(norm_first))

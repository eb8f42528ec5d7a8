"""Bit-switchable layers: per-bit step sizes, Stage I, data-driven initialisation, bit sets."""

import math

import pytest
import torch

from bitmixer_core.quantizer import fitted_step_size
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
    """The step sizes are learned as log alpha, one entry per bit-width, weights' and activations' as the two
    rows of one parameter; weight ones start at the least-squares fit of the quantizer to the weights
    (fitted_step_size) at construction."""
    layer = QConv2d(4, 8, 3, padding=1, bits=BitWidths(weights=(1, 3, 4), activations=(2, 3, 4)))
    names = dict(layer.named_parameters())
    assert set(names) == {"weight", "log_step_size"} and names["log_step_size"].shape == (2, 3)
    assert layer.log_weight_step_size.data_ptr() == names["log_step_size"][0].data_ptr()
    assert layer.log_activation_step_size.data_ptr() == names["log_step_size"][1].data_ptr()
    expected = [fitted_step_size(layer.weight, b).item() for b in (1, 3, 4)]
    assert layer.weight_step_size.tolist() == pytest.approx(expected, rel=1e-5)
    assert all(a > 0 for a in expected)


def test_a_checkpoint_with_separate_weight_and_activation_step_sizes_loads():
    """A state dict written before the step sizes were stacked (two parameters per layer) loads into the rows
    of log_step_size, and the layer quantizes with those values."""
    layer = QConv2d(4, 8, 3, padding=1, bits=BitWidths(weights=(2, 3, 4), activations=(2, 3, 4)))
    old = {k: v for k, v in layer.state_dict().items() if k != "log_step_size"}
    old["log_weight_step_size"] = torch.tensor([-1.0, -2.0, -3.0])
    old["log_activation_step_size"] = torch.tensor([0.5, 0.25, 0.125])
    layer.load_state_dict(old)
    assert layer.log_weight_step_size.tolist() == [-1.0, -2.0, -3.0]
    assert layer.log_activation_step_size.tolist() == [0.5, 0.25, 0.125]
    layer.set_bit_width(3)
    levels = layer.quantized_weight().detach() / math.exp(-2.0)
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-5)


def test_activation_step_initialised_from_first_training_batch_only():
    """The first training batch at a bit-width sets its activation step size; later batches do not."""
    layer = QLinear(16, 4)
    layer.train()
    x = torch.randn(32, 16)
    layer(x)
    i = layer.bit_widths.index(layer.bits)
    assert bool(layer.activation_step_initialized[i])
    first = fitted_step_size(x, layer.bits).item()
    assert layer.activation_step_size[i].item() == pytest.approx(first, rel=1e-5)
    layer(x * 100)
    assert layer.activation_step_size[i].item() == pytest.approx(first, rel=1e-5)
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
    weight_grad, activation_grad = layer.log_step_size.grad
    assert not weight_grad.any() and activation_grad.abs().sum() > 0
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
    assert layer.weight_step_size[-1].item() == pytest.approx(fitted_step_size(layer.weight, 4).item(), rel=1e-5)


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


def test_step_sizes_stay_positive_under_a_large_learning_rate():
    """300 Adam steps at lr 0.05 (with weight decay on the other parameters) leave every step size of
    every layer and bit-width positive and finite: alpha is learned as its logarithm. A plain alpha of
    about 0.01 moved by ~lr a step would cross zero within a few steps."""
    from bitmixer_core import StagePolicy, step_size_parameters
    torch.manual_seed(0)
    model = build_model("resnet_tiny", num_classes=4, stem="small", first_last="int8")
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))
    calibrate_activation_step_sizes(model, images)
    steps = {id(p) for p in step_size_parameters(model)}
    others = [p for p in model.parameters() if id(p) not in steps]
    optimizer = torch.optim.Adam([{"params": others, "weight_decay": 1e-4},
                                  {"params": step_size_parameters(model), "weight_decay": 0.0}], lr=0.05)
    policy, g = StagePolicy.stage_three(k=1.0, ramp_epochs=0), torch.Generator().manual_seed(0)
    names = [n for n, _ in quantized_layers(model)]
    smallest = math.inf
    for _ in range(300):
        apply_assignment(model, policy.sample(names, None, 1.0, g))
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        smallest = min(smallest, min(float(m.weight_step_size.detach().min()) for _, m in quantized_layers(model)))
    for module in model.modules():
        if hasattr(module, "log_weight_step_size"):
            for alpha in (module.weight_step_size, module.activation_step_size):
                assert torch.isfinite(alpha).all() and (alpha > 0).all()
    assert smallest > 0
    assert len(step_size_parameters(model)) == sum(1 for m in model.modules() if hasattr(m, "log_weight_step_size"))

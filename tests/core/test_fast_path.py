"""The fast path (a ReLU that the next layer's unsigned quantizer makes redundant is skipped) against the
reference path (layers.set_reference_path: every ReLU kept): the same outputs and gradients, bit for bit.

Why exact: floor(clip(relu(x) / alpha, 0, hi)) = floor(clip(x / alpha, 0, hi)) for alpha > 0, and the
quantizer's gradient masks agree (x <= 0 is outside its range, so its gradient is 0 as through the ReLU; the
step size's clip-bound term is 0 * g there), so every value the two paths compute is the same number."""

import copy

import pytest
import torch
import torch.nn.functional as F

from bitmixer_core import build_model, calibrate_activation_step_sizes, quantized_layers, set_bits
from bitmixer_core.layers import set_reference_path


def train_step_results(model, images, labels):
    model.zero_grad(set_to_none=True)
    out = model(images)
    F.cross_entropy(out, labels).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block_order", ["conv_bn_relu", "bn_quantize_conv"])
def test_fast_path_gives_the_reference_outputs_and_gradients(block_order):
    """A training step of a calibrated network at mixed bit-widths (Stage III), then an evaluation forward:
    the fast path's outputs and every gradient (step sizes included) are the reference's, bit for bit."""
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    fast = build_model("resnet_tiny", num_classes=10, stem="small", block_order=block_order)
    calibrate_activation_step_sizes(fast, images)
    reference = copy.deepcopy(fast)
    set_reference_path(reference, True)
    bit_choices = quantized_layers(fast)[0][1].bit_widths.activations
    mixed = [bit_choices[i % len(bit_choices)] for i in range(len(quantized_layers(fast)))]
    for model in (fast, reference):
        set_bits(model, mixed)
        model.train()
    if block_order == "conv_bn_relu":  # the redundant ReLUs are skipped only in this order
        assert any(layer.rectifies_input() for _, layer in quantized_layers(fast))
    assert not any(layer.rectifies_input() for _, layer in quantized_layers(reference))

    out_fast, grads_fast = train_step_results(fast, images, labels)
    out_ref, grads_ref = train_step_results(reference, images, labels)
    assert torch.equal(out_fast, out_ref)
    assert grads_fast.keys() == grads_ref.keys()
    for name, grad in grads_ref.items():
        assert torch.equal(grads_fast[name], grad), name
    for model in (fast, reference):
        model.eval()
    with torch.no_grad():
        assert torch.equal(fast(images), reference(images))


def test_step_sizes_initialised_in_training_read_the_rectified_input():
    """A network never calibrated initialises its activation step sizes from the first training batch; the
    fast path keeps the ReLU until then, so the step sizes and the outputs are the reference's."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    fast = build_model("resnet_tiny", num_classes=10, stem="small")
    reference = copy.deepcopy(fast)
    set_reference_path(reference, True)
    for model in (fast, reference):
        model.train()
    for bits in quantized_layers(fast)[0][1].bit_widths.activations:  # each bit-width's first batch
        assert not any(layer.rectifies_input() for _, layer in quantized_layers(fast))  # a step size to come
        for model in (fast, reference):
            set_bits(model, bits)
        assert torch.equal(fast(images), reference(images))
    for (name, a), (_, b) in zip(quantized_layers(fast), quantized_layers(reference)):
        assert torch.equal(a.log_activation_step_size, b.log_activation_step_size), name
    assert any(layer.rectifies_input() for _, layer in quantized_layers(fast))  # from then on, skipped

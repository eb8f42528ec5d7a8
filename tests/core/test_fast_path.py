"""The fast path (blocked quantizer passes on CPU, the ReLU a quantizer makes redundant skipped) against the
eager reference path (layers.set_reference_path): the same outputs and gradients.

Everything element-wise is the same arithmetic on the same values, so it must agree bit for bit. The one
exception is the step size's gradient: two dot products over the whole tensor, which the fast path sums
block by block, i.e. in another order. Both orders approximate the exact sum within the probabilistic bound
of Higham & Mary (2019) for a float32 sum of n terms, lambda * sqrt(n) * u * sum|term_i| (u = 2**-24,
lambda = 8: exceeded by chance with probability below 1e-13), whatever order the CPU's dot product uses; the
two results therefore differ by at most twice that, plus a few roundings of the final scalar operations."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bitmixer_core import build_model, calibrate_activation_step_sizes, quantize, quantized_layers, set_bits
from bitmixer_core import quantizer as quantizer_module
from bitmixer_core.layers import set_reference_path

U, LAMBDA = 2.0 ** -24, 8.0


def dot_sum_bound(n: int, magnitude: float, value: float) -> float:
    """How far two float32 evaluations of (g . q - g_inside . x) * c may differ (see the module docstring)."""
    return 2 * (LAMBDA * math.sqrt(n) * U * magnitude + 4 * U * abs(value))


@pytest.mark.parametrize("bits,signed", [(1, True), (1, False), (2, True), (2, False), (4, True), (8, False)])
@pytest.mark.parametrize("rounding", ["floor", "round"])
@pytest.mark.parametrize("alpha0", [0.3, -0.3])
def test_blocked_quantizer_equals_the_whole_tensor_passes(monkeypatch, bits, signed, rounding, alpha0):
    """Over several blocks and a shorter last one: the output and the gradient of x are bit for bit those of
    the reference; the step size's gradient is within the bound of two float32 sums of n terms."""
    monkeypatch.setattr(quantizer_module, "BLOCK_ELEMENTS", 1000)
    torch.manual_seed(bits)
    x = torch.randn(4, 1009) * 2 ** (bits - 1) * abs(alpha0)  # 4.04 blocks, across and beyond the range
    x[0, :8] = torch.tensor([0.0, -0.0, alpha0, -alpha0, 2 * alpha0, 1e-30, -1e-30, 3 * alpha0])  # edges
    g = torch.randn_like(x)
    results = []
    for blocked in (False, True):
        xr = x.clone().requires_grad_()
        alpha = torch.tensor(alpha0, requires_grad=True)
        q = quantize(xr, alpha, bits, rounding=rounding, signed=signed, blocked=blocked)
        (q * g).sum().backward()
        results.append((q.detach(), xr.grad, alpha.grad, q.detach(), alpha))
    (q_ref, gx_ref, ga_ref, q, alpha), (q_fast, gx_fast, ga_fast, _, _) = results
    assert torch.equal(q_fast, q_ref) and torch.equal(gx_fast, gx_ref)
    scale = 1.0 / math.sqrt(x.numel() * (2 ** (bits - 1) - 1 if signed and bits > 1 else 1 if signed else 2**bits - 1))
    magnitude = ((g * q).abs().sum() + (gx_ref * x).abs().sum()).item() / abs(alpha0) * scale
    bound = dot_sum_bound(x.numel(), magnitude, ga_ref.item())
    assert abs(ga_fast.item() - ga_ref.item()) <= bound, (ga_fast.item(), ga_ref.item(), bound)
    # The bound is about 3e-5 of the sum's magnitude: a lost or doubled block (a quarter of it) would fail.
    assert bound < 1e-4 * magnitude


@pytest.fixture
def recorded_step_size_terms(monkeypatch):
    """Small blocks (so the test's small tensors span several), and, for every step-size gradient computed,
    (n, sum |terms| of its log step size's gradient): the quantities the bound needs."""
    monkeypatch.setattr(quantizer_module, "BLOCK_ELEMENTS", 4096)
    records = []
    original = quantizer_module._LinearQuantize.backward

    def recording(ctx, grad):
        result = original(ctx, grad)
        x, alpha, out = ctx.saved_tensors
        if result[1] is not None and result[0] is not None:
            # d/d(log alpha) = alpha * d/d(alpha): the alpha of the dot products' division cancels.
            terms = ((grad * out).abs().sum() + (result[0] * x).abs().sum()) * ctx.scale
            records.append((x.numel(), float(terms)))
        return result

    monkeypatch.setattr(quantizer_module._LinearQuantize, "backward", staticmethod(recording))
    return records


def train_step_results(model, images, labels):
    model.zero_grad(set_to_none=True)
    out = model(images)
    F.cross_entropy(out, labels).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("block_order", ["conv_bn_relu", "bn_quantize_conv"])
def test_fast_path_gives_the_reference_outputs_and_gradients(recorded_step_size_terms, block_order):
    """A training step of a calibrated network at mixed bit-widths (Stage III) and an evaluation forward:
    the fast path's outputs and gradients are the reference's, bit for bit; the step sizes' gradients
    agree within the bound of their float32 sums."""
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
    recorded_step_size_terms.clear()
    out_ref, grads_ref = train_step_results(reference, images, labels)
    assert torch.equal(out_fast, out_ref)
    assert grads_fast.keys() == grads_ref.keys()
    n, terms = max(r[0] for r in recorded_step_size_terms), max(r[1] for r in recorded_step_size_terms)
    for name, grad in grads_ref.items():
        if "step_size" in name:  # a per-element bound as large as the largest of the model's sums
            bound = dot_sum_bound(n, terms, float(grad.abs().max())) + 4 * U * float(grad.abs().max())
            assert (grads_fast[name] - grad).abs().max() <= bound, name
        else:
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

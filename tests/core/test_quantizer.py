"""Eq. 1-4 against a float64 reference written here, and the LSQ gradients against their formulas."""

import math

import numpy as np
import pytest
import torch

from bitmixer_core import QuantizerOptions, initial_step_size, quantize, quantize_nested
from bitmixer_core.quantizer import fitted_step_size

ALPHA = 0.5  # a power of two: x / alpha is exact, so the reference and torch must agree bit for bit


def integer_bounds(bits, symmetric):
    if bits == 1:
        return -1, 1
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def reference_eq2(x, alpha, bits, rounding="floor", symmetric=True):
    """q_b(x) = alpha * q'(clip(x/alpha, lo, hi)); q' = floor (or round) for b > 1, sign (sign(0)=+1) for b = 1."""
    lo, hi = integer_bounds(bits, symmetric)
    v = np.clip(x / alpha, lo, hi)
    if bits == 1:
        return alpha * np.where(v >= 0, 1.0, -1.0)
    return alpha * (np.floor(v) if rounding == "floor" else np.round(v))


def probe_values(bits, symmetric):
    """Values across and beyond the range, including exactly the clip edges and half steps."""
    lo, hi = integer_bounds(bits, symmetric)
    grid = np.arange(lo - 2, hi + 2.25, 0.25) * ALPHA
    edges = np.array([lo, hi, lo - 1e-9, hi + 1e-9, lo + 1e-9, hi - 1e-9, 0.0, -0.0, 1e-12, -1e-12]) * ALPHA
    rng = np.random.default_rng(bits)
    return np.concatenate([grid, edges, rng.normal(0, hi * ALPHA, 200)])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("rounding", ["floor", "round"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_matches_float64_reference_of_eq2(bits, rounding, symmetric):
    """quantize must equal alpha * q'(clip(x/alpha, -m_b, m_b)) exactly, clip edges included."""
    x = probe_values(bits, symmetric)
    got = quantize(torch.tensor(x), torch.tensor(ALPHA, dtype=torch.float64), bits,
                   rounding=rounding, symmetric=symmetric)
    np.testing.assert_array_equal(got.numpy(), reference_eq2(x, ALPHA, bits, rounding, symmetric))


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_floor_uses_exactly_the_2m_plus_1_states(bits):
    """The symmetric range is {-m_b..m_b} (2**b - 1 states) and the floor is not symmetric around 0."""
    x = torch.linspace(-10, 10, 20001, dtype=torch.float64) * 2 ** bits
    levels = torch.unique(quantize(x, torch.tensor(1.0, dtype=torch.float64), bits) / 1.0)
    m = 2 ** (bits - 1) - 1
    assert levels.tolist() == list(range(-m, m + 1))
    assert quantize(torch.tensor([-0.3], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), bits).item() == -1


def test_binary_is_plus_minus_alpha_with_sign_of_zero_positive():
    """b = 1 is alpha * sign(x), and sign(0) = +1 so there are exactly two states."""
    x = torch.tensor([-3.0, -0.1, 0.0, 0.1, 3.0])
    assert quantize(x, torch.tensor(0.7), 1).tolist() == pytest.approx([-0.7, -0.7, 0.7, 0.7, 0.7])


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("rounding", ["floor", "round"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("alpha0", [0.37, -0.37])
def test_gradients_follow_ste_and_lsq_formulas(bits, rounding, symmetric, alpha0):
    """dq/dx = 1 inside the clip range, 0 outside (an exact edge counts as outside: its value is the
    bound); dq/dalpha = q'(v) - v inside, the bound outside, times the LSQ scale 1/sqrt(numel * max(m_b, 1))."""
    torch.manual_seed(bits)
    lo, hi = integer_bounds(bits, symmetric)  # a negative alpha (it is learned) must work the same way
    x = (torch.rand(500, dtype=torch.float64) * (hi - lo + 4) + lo - 2) * alpha0
    x = x.requires_grad_()
    alpha = torch.tensor(alpha0, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(500, dtype=torch.float64)
    (quantize(x, alpha, bits, rounding=rounding, symmetric=symmetric) * upstream).sum().backward()

    v = x.detach() / alpha0
    inside = (v > lo) & (v < hi)
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))

    vc = v.clamp(lo, hi)
    if bits == 1:
        q = torch.where(vc >= 0, 1.0, -1.0).double()
    else:
        q = vc.floor() if rounding == "floor" else vc.round()
    per_element = torch.where(inside, q - v, vc)
    scale = 1.0 / math.sqrt(x.numel() * max(2 ** (bits - 1) - 1, 1))
    torch.testing.assert_close(alpha.grad, (upstream * per_element).sum() * scale)


def test_log_step_size_gradient_is_the_chain_rule_through_exp_in_one_autograd_node():
    """The layers' path (quantize_log_step) must give the gradient of quantize(x, exp(log_steps[i])) to the
    whole tensor of log step sizes (a layer's [weights; activations] x bit-widths, zero where not used), as one
    node whose parents are x and that tensor: a select / exp chain between would cost a GPU step three kernel
    launches more."""
    from bitmixer_core.quantizer import quantize_log_step
    torch.manual_seed(0)
    x = (torch.randn(6, 3, 5, 5, dtype=torch.float64) * 2).requires_grad_()
    g = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    for index, bits in (((1, 0), 2), ((0, 2), 4)):
        log_steps = torch.tensor([[-0.7, 0.1, -1.2], [0.3, -0.4, -2.0]], dtype=torch.float64, requires_grad=True)
        out = quantize_log_step(x, log_steps, index, bits, signed=False, gradient_numel=75)
        parents = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
        assert parents == {"AccumulateGrad"}, parents
        (out * g).sum().backward()
        reference_steps = log_steps.detach().clone().requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        expected = quantize(x_ref, reference_steps[index].exp(), bits, signed=False, gradient_numel=75)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        (expected * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
        # Both forms sum the same n products (g . out and g_inside . v) in float64; each sum is within
        # gamma_n * sum|terms| of exact (gamma_n = n u / (1 - n u), u = 2**-53, any order), and the few scalar
        # operations after it add a few u of the result.
        alpha = float(log_steps.detach()[index].exp())
        v = x.detach() / alpha
        inside = ((v > 0) & (v < 2 ** bits - 1)).double()
        terms = (g * expected.detach()).abs().sum() + alpha * (g * inside * v).abs().sum()
        n, u = x.numel(), 2.0 ** -53
        scale = 1.0 / math.sqrt(75 * (2 ** bits - 1))
        bound = 2 * (n * u / (1 - n * u)) * float(terms) * scale + 8 * u * abs(float(reference_steps.grad[index]))
        assert abs(float(log_steps.grad[index] - reference_steps.grad[index])) <= bound
        assert bound < 1e-6 * abs(float(reference_steps.grad[index]))  # tight enough to catch a wrong term
        assert log_steps.grad[index] != 0 and log_steps.grad.count_nonzero() == 1
        x.grad = None


def test_channels_last_input_gives_the_gradients_of_the_contiguous_one():
    """The backward reads a channels-last activation in its memory order: the same values as for the NCHW copy.
    Tolerance: the two dot products sum the same float32 terms in another order, so each may differ by
    n * u * sum|term| (n = 2048 terms, u = 2**-24), a deterministic worst-case bound."""
    torch.manual_seed(1)
    x = torch.rand(4, 8, 8, 8) * 3
    g = torch.randn(4, 8, 8, 8)
    grads = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xm = x.clone(memory_format=memory_format).requires_grad_()
        alpha = torch.tensor(0.4, requires_grad=True)
        (quantize(xm, alpha, 3, signed=False) * g.contiguous(memory_format=memory_format)).sum().backward()
        assert xm.is_contiguous(memory_format=memory_format)
        grads.append((xm.grad, alpha.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    terms = (g.abs() * quantize(x, torch.tensor(0.4), 3, signed=False).abs()).sum() / 0.4 + (g.abs() * x / 0.4).sum()
    scale = 1.0 / (x.numel() * 7) ** 0.5  # LSQ's scale, N = numel, Q_P = 2**3 - 1
    bound = x.numel() * 2.0 ** -24 * float(terms) * scale
    assert abs(float(grads[0][1] - grads[1][1])) <= bound


def test_float32_step_size_gradient_is_accurate_on_large_tensors():
    """The dot-product form of the alpha gradient keeps float32 accuracy on an activation-sized tensor.

    The tolerance is the probabilistic bound of Higham & Mary (2019) for a float32 sum of n terms in any
    order, lambda * sqrt(n) * u * sum|term_i| (u = 2**-24, lambda = 8: fails by chance with probability
    below 1e-13), applied to the two dot products of the backward pass; it does not depend on the CPU's
    reduction order (AVX2 and AVX-512 sum in different orders). The incoming gradient is positive so the
    sum is well conditioned and the bound is tight enough to catch a wrong term."""
    torch.manual_seed(0)
    x = torch.randn(64, 64, 16, 16)
    g = torch.rand_like(x) + 0.5
    u, lam = 2.0 ** -24, 8.0
    for bits in (2, 4, 8):
        alpha = torch.tensor(0.05 if bits == 8 else 0.5, requires_grad=True)
        (quantize(x, alpha, bits) * g).sum().backward()
        xd, gd, ad = x.double(), g.double(), alpha.detach().double()
        m = 2 ** (bits - 1) - 1
        v = xd / ad
        inside = (v > -m) & (v < m)
        vc = v.clamp(-m, m)
        scale = 1.0 / (x.numel() * m) ** 0.5
        expected = (gd * torch.where(inside, vc.floor() - v, vc)).sum() * scale
        # Backward computes (g . q / alpha - g_inside . v) * scale: bound each dot product's rounding error.
        magnitude = ((gd * vc.floor() * ad).abs().sum() + (gd * inside * xd).abs().sum()) / ad * scale
        bound = lam * math.sqrt(x.numel()) * u * magnitude.item() + 4 * u * abs(expected.item())
        assert abs(alpha.grad.item() - expected.item()) <= bound, (bits, alpha.grad.item(), expected.item(), bound)
        assert bound < 0.05 * abs(expected.item())  # tight enough that a wrong sign or a lost term fails


def test_a_bf16_input_gets_the_levels_and_mask_of_its_exact_values():
    """Under bf16 autocast a quantizer reads a bf16 activation. Its levels and straight-through mask must be
    those of the exact quotient x / alpha (bf16 -> float32 is exact; one float32 division rounds once), not of
    a bf16 quotient: rounded to 8 bits, a value just below an integer level becomes that level, so floor()
    moves it one level up (up to 1/32 of a 4-bit range's values) and a value just inside the top bound counts
    as outside. Every 4-bit quotient from 0 to 16 in 1/512 steps is tried; the output is the float32 product
    alpha * level rounded once to bf16."""
    from bitmixer_core.quantizer import quantize_log_step
    log_steps = torch.tensor([[0.0], [math.log(0.37)]], requires_grad=True)
    alpha = log_steps.detach()[1, 0].exp()
    x = (torch.arange(0, 16 * 512) / 512 * alpha).bfloat16().requires_grad_()
    v = x.detach().float() / alpha  # the exact quotient, rounded once to float32
    assert ((x.detach() / alpha).floor() != v.floor()).sum() > 100  # a bf16 quotient would get these wrong
    g = torch.linspace(-1, 1, x.numel()).bfloat16()
    out = quantize_log_step(x, log_steps, (1, 0), 4, signed=False, gradient_numel=x.numel())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (v.clamp(0, 15).floor() * alpha).bfloat16(), rtol=0, atol=0)
    out.backward(g)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad, torch.where((v > 0) & (v < 15), g, 0), rtol=0, atol=0)
    # The step size's gradient against float64 on the same bf16 values: the output is rounded to bf16 (half an
    # ulp, 2**-9 relative, per element) and so is the bf16 dot product g . out (2**-9 of its value); the float32
    # sums add n u sum|terms| each.
    vd, gd, ad = x.detach().double() / alpha.double(), g.double(), alpha.double()
    inside = (vd > 0) & (vd < 15)
    scale = 1.0 / math.sqrt(x.numel() * 15)
    expected = float((gd * torch.where(inside, vd.clamp(0, 15).floor() - vd, vd.clamp(0, 15))).sum() * ad * scale)
    g_out = (gd * (vd.clamp(0, 15).floor() * ad)).abs().sum()
    bound = (2 * 2.0 ** -9 + x.numel() * 2.0 ** -24) * float(g_out) * scale \
        + x.numel() * 2.0 ** -24 * float((gd * inside * vd).abs().sum() * ad) * scale
    assert abs(float(log_steps.grad[1, 0]) - expected) <= bound
    assert bound < 0.1 * abs(expected)


def test_gradient_numel_sets_the_lsq_scale():
    """The step-size gradient scale uses the given N (per-sample feature count for activations)."""
    x = torch.randn(4, 10, dtype=torch.float64)
    grads = []
    for numel in (None, 10):
        alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        quantize(x, alpha, 3, gradient_numel=numel).sum().backward()
        grads.append(alpha.grad)
    torch.testing.assert_close(grads[1], grads[0] * math.sqrt(40 / 10))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("rounding", ["floor", "round"])
def test_clip_nesting_matches_eq3_eq4(bits, rounding):
    """Eq. 3-4: W_n = q'(clip(W/alpha, -m_n, m_n)); W_i = alpha * clip(W_n, -m_i, m_i) (sign for b = 1)."""
    x = probe_values(4, True)
    got = quantize_nested(torch.tensor(x), torch.tensor(ALPHA, dtype=torch.float64), bits, 4, rounding=rounding)
    levels = reference_eq2(x, ALPHA, 4, rounding) / ALPHA
    if bits == 1:
        expected = ALPHA * np.where(levels >= 0, 1.0, -1.0)
    else:
        m = 2 ** (bits - 1) - 1
        expected = ALPHA * np.clip(levels, -m, m)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_initial_step_size_is_two_mean_abs_over_sqrt_m():
    """LSQ init: 2 mean|x| / sqrt(m_b), with m taken as 1 for binary."""
    x = torch.tensor([1.0, -3.0, 2.0, -2.0])
    assert initial_step_size(x, 4).item() == pytest.approx(2 * 2.0 / math.sqrt(7))
    assert initial_step_size(x, 1).item() == pytest.approx(4.0)


def test_bad_options_are_rejected_with_the_field_named():
    """Unknown rounding / nesting values and out-of-range bits fail with a sentence naming them."""
    with pytest.raises(ValueError, match="rounding"):
        QuantizerOptions(rounding="ceil")
    with pytest.raises(ValueError, match="nesting"):
        QuantizerOptions.coerce({"nesting": "share"})
    with pytest.raises(ValueError, match="unknown key"):
        QuantizerOptions.coerce({"round": "floor"})
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
        quantize(torch.zeros(2), torch.tensor(1.0), 9)


@pytest.mark.parametrize("bits,signed", [(1, True), (2, True), (4, True), (1, False), (2, False)])
def test_fitted_step_size_is_the_least_squares_step_on_its_grid(bits, signed):
    """fitted_step_size returns the grid step with the smallest quantization error, checked against a
    brute-force float64 evaluation of every candidate; on a near-uniform signed input it reaches the top
    state that LSQ's 2 mean|x| / sqrt(m_b) leaves unused at 2 bits."""
    torch.manual_seed(bits)
    x = torch.rand(4096) * 3.4 - 1.7 if signed else torch.relu(torch.randn(4096))
    got = fitted_step_size(x, bits, signed=signed).item()
    lsq = initial_step_size(x, bits, signed).item()
    lo, hi = integer_bounds(bits, True) if signed else (0, 2**bits - 1)
    def error(alpha):
        v = np.clip(x.double().numpy() / alpha, lo, hi)
        q = np.where(v >= 0, 1.0, -1.0) if bits == 1 and signed else np.floor(v)
        return np.mean((q * alpha - x.double().numpy()) ** 2)
    grid = [lsq * s for s in np.linspace(0.05, 1.5, 48)]
    assert error(got) <= min(error(a) for a in grid) * (1 + 1e-6)
    if bits == 2 and signed:
        assert (x >= lsq).sum() == 0 and (x >= got).sum() > 0.1 * x.numel()

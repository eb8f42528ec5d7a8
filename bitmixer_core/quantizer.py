"""Eq. 1-4 of the paper: the unified LSQ-style quantizer of Bit-Mixer.

    q_b(x) = alpha * q'( clip(x / alpha, -m_b, m_b) ),   m_b = 2**(b-1) - 1
    q'     = floor            for b > 1
             sign             for b = 1   (m_1 = 0, so the clip range is [-1, 1] and the output is +-alpha)

The gradients follow LSQ (Esser et al., 2020): straight-through for x strictly inside the clip range and
zero outside (a value exactly on the edge is the bound, so it counts as outside); for alpha, d q / d alpha = q'(v) - v inside and the clip bound outside, scaled by
1 / sqrt(numel * max(m_b, 1)).

Decisions written down here because the paper leaves them open:
- sign(0) = +1, so every binary value is exactly +-alpha (no third state at 0).
- floor(clip(x/alpha)) is not symmetric around 0 (floor(-0.3) = -1); that is the paper's formula and it is
  kept on purpose: it lets W_i be obtained from W_{i+1} without the real weights (section 3.1).
- rounding="round" uses torch.round, i.e. round-half-to-even.
- The asymmetric variant (section 4.6) clips to [-2**(b-1), 2**(b-1) - 1]; for b = 1 it is the same
  sign quantizer (a 1-bit asymmetric range {-1, 0} would not be a binary network).
- Eq. 2's range assumes a signed input (footnote 1). For an input that is never negative (a tensor read
  straight after a ReLU) the `signed=False` range [0, 2**b - 1] uses every state: floor for every b,
  so 1 bit is the step {0, alpha} instead of a constant sign(x) = +1. The default block order
  (conv_bn_relu, models/resnet.py) feeds every switchable quantizer a post-ReLU tensor and uses this range;
  the other order (bn_quantize_conv) feeds a signed tensor and uses Eq. 2 as written.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

ROUNDINGS = ("floor", "round")
LOW_PRECISION = (torch.bfloat16, torch.float16)
NESTINGS = ("scale", "clip")


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value of x, gradient of x times scale (LSQ's step-size gradient scale)."""
    scaled = x * scale
    return (x - scaled).detach() + scaled


def floor_pass(x: torch.Tensor) -> torch.Tensor:
    """floor(x) forward, identity backward (straight-through estimator)."""
    return (x.floor() - x).detach() + x


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (half to even), identity backward."""
    return (x.round() - x).detach() + x


def sign_pass(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1 forward, identity backward. Integer range {-1, +1}."""
    sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    return (sign - x).detach() + x


def integer_range(bits: int, symmetric: bool = True, signed: bool = True) -> tuple[int, int]:
    """(lowest, highest) integer state of a b-bit quantizer; signed b = 1 is binary: (-1, 1)."""
    if not signed:
        return 0, 2**bits - 1  # a non-negative input: all 2**b states, {0, 1} at one bit
    if bits == 1:
        return -1, 1
    if symmetric:
        m = 2 ** (bits - 1) - 1  # m_b of Eq. 2: the range {-m_b, ..., m_b} discards one state
        return -m, m
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def max_level(bits: int) -> int:
    """m_b = 2**(b-1) - 1 of Eq. 2 (0 for binary)."""
    return 2 ** (bits - 1) - 1


def positive_levels(bits: int, signed: bool = True) -> int:
    """LSQ's Q_P, the highest positive integer state: m_b (taken as 1 for binary), or 2**b - 1 unsigned."""
    return max(max_level(bits), 1) if signed else 2**bits - 1


def lsq_gradient_scale(numel: int, bits: int, signed: bool = True) -> float:
    """LSQ's gradient scale for the step size: 1 / sqrt(numel * Q_P)."""
    return 1.0 / math.sqrt(max(int(numel), 1) * positive_levels(bits, signed))


def initial_step_size(x: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """LSQ initialisation 2 * mean|x| / sqrt(Q_P), as a 0-dim tensor."""
    return 2.0 * x.detach().abs().mean() / math.sqrt(positive_levels(bits, signed))


def fitted_step_size(x: torch.Tensor, bits: int, *, signed: bool = True, symmetric: bool = True,
                     rounding: str = "floor", samples: int = 65536, candidates: int = 48) -> torch.Tensor:
    """The step size that reproduces x best: the least-squares fit of the b-bit quantizer over a grid of
    multiples (0.05x to 1.5x) of LSQ's 2 * mean|x| / sqrt(Q_P), on at most `samples` evenly strided values.

    Why not LSQ's value itself: it assumes a bell-shaped input and a rounding quantizer. With floor, state
    k covers [k alpha, (k+1) alpha), so on a signed input the top state is reached only from x >= m_b alpha:
    LSQ's alpha leaves it nearly or wholly unused at 2 bits (never, for the near-uniform inputs that follow
    a BN in early layers), and at 1 bit on unsigned inputs it puts the step above 98 % of the values."""
    flat = x.detach().float().flatten()
    if flat.numel() > samples:
        flat = flat[:: flat.numel() // samples][:samples]
    lsq = initial_step_size(flat, bits, signed).clamp_min(1e-8)
    alphas = lsq * torch.linspace(0.05, 1.5, candidates, device=flat.device)
    lo, hi = integer_range(bits, symmetric, signed)
    v = (flat[None, :] / alphas[:, None]).clamp(lo, hi)
    levels = _levels_(v, "sign" if bits == 1 and signed else rounding)
    error = (levels * alphas[:, None] - flat[None, :]).square().mean(dim=1)
    return alphas[int(error.argmin())]


class _LinearQuantize(torch.autograd.Function):
    """Eq. 2 with its LSQ gradients as one autograd node, alpha read from a tensor of step sizes: alpha =
    steps[index], or exp(steps[index]) where it holds log step sizes (the layers' parametrisation).

    One node rather than the chain select -> exp -> grad_scale -> clamp -> floor_pass / round_pass / sign_pass
    -> * alpha: a training step pays 10 operators (kernel launches on a GPU) per quantizer instead of 23, and a
    GPU step waits on the host's launches (docs/benchmarks.md, "GPU"). With v = x / alpha (saved) and out =
    alpha q'(clip(v, lo, hi)) (which the conv saves anyway), backward is
        dq/dx = 1 strictly inside (lo, hi), else 0: hardtanh's backward on v with the integer bounds, one kernel
                that never reads alpha on the host, whatever its sign (an exact edge is the bound: outside);
        sum_i g_i dq_i/dalpha = sum_i g_i (q'(v_i) - v_i [inside]) + g_i bound [outside]
                              = g . out / alpha - (g [inside]) . v,
        and for log alpha (d alpha = alpha d log alpha): g . out - alpha (g [inside]) . v,
    times LSQ's gradient scale, at the index's place in the step-size tensor's gradient."""

    @staticmethod
    def forward(ctx, x, steps, index, log_domain: bool, lo: int, hi: int, rounding: str, scale: float):
        alpha = steps[index].exp() if log_domain else steps[index]
        # A bf16 input (a GPU stage's BN output under autocast) is divided by a one-element alpha: type promotion
        # then makes v float32 (bf16 -> float32 is exact) in the same one kernel, so its levels are Eq. 2's; a
        # 0-dim alpha would keep v in bf16, whose 8 bits put up to 1/32 of the values of a 4-bit range one level
        # too high and move the step size's gradient by several per cent (bench/quantizer_bf16.py). The output
        # keeps the input's dtype.
        low_precision = x.dtype in LOW_PRECISION and alpha.dtype not in LOW_PRECISION
        v = torch.div(x, alpha.reshape(1) if low_precision else alpha)
        levels = _levels_(v.clamp(lo, hi), rounding)
        out = torch.mul(levels, alpha, out=torch.empty_like(x)) if low_precision else levels.mul_(alpha)
        ctx.save_for_backward(v, alpha, out)
        ctx.index, ctx.steps, ctx.log_domain = index, tuple(steps.shape), log_domain
        ctx.lo, ctx.hi, ctx.scale = lo, hi, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        v, alpha, out = ctx.saved_tensors
        grad_x = torch.ops.aten.hardtanh_backward(grad, v, ctx.lo, ctx.hi)
        grad_steps = None
        if ctx.needs_input_grad[1]:
            g_dot_q, inside_dot_v = _dot(grad, out), _dot(grad_x, v)
            if ctx.log_domain:
                grad_step = torch.addcmul(g_dot_q, alpha, inside_dot_v, value=-1.0)
            else:
                grad_step = g_dot_q / alpha - inside_dot_v
            grad_steps = grad_step * _scaled_unit(ctx.steps, ctx.index, ctx.scale, alpha)
        if grad_x.dtype != grad.dtype:  # float32 where v is (a bf16 input): the input's dtype again
            grad_x = grad_x.to(grad.dtype)
        return (grad_x if ctx.needs_input_grad[0] else None), grad_steps, None, None, None, None, None, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a . b over every element; two channels-last tensors are read in their memory order (no copy)."""
    if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last) \
            and b.is_contiguous(memory_format=torch.channels_last):
        a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
    return torch.dot(a.reshape(-1), b.reshape(-1))


_SCALED_UNITS: dict[tuple, torch.Tensor] = {}


def _scaled_unit(shape: tuple[int, ...], index, scale: float, like: torch.Tensor) -> torch.Tensor:
    """A tensor of `shape`, `scale` at `index` and 0 elsewhere, on like's device and dtype, made once per layer
    setting: placing a step size's scaled gradient in its tensor's gradient is then one multiplication."""
    key = (shape, index, scale, like.device, like.dtype)
    unit = _SCALED_UNITS.get(key)
    if unit is None:
        unit = _SCALED_UNITS[key] = torch.zeros(shape, device=like.device, dtype=like.dtype)
        unit[index] = scale
    return unit


def _levels_(v: torch.Tensor, rounding: str) -> torch.Tensor:
    """q' of Eq. 2, in place on already clipped values: floor, round, or sign (sign(0) = +1) for binary."""
    if rounding == "sign":
        return torch.where(v >= 0, 1.0, -1.0).to(v.dtype)
    return v.floor_() if rounding == "floor" else v.round_()


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}.")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}.")


def quantize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    bits: int,
    *,
    rounding: str = "floor",
    symmetric: bool = True,
    signed: bool = True,
    gradient_numel: int | None = None,
) -> torch.Tensor:
    """Eq. 2: alpha * q'(clip(x / alpha, lo, hi)), with the LSQ gradients.

    gradient_numel is the N of LSQ's gradient scale 1/sqrt(N * Q_P); it defaults to x.numel()
    (right for weights); layers pass the per-sample feature count for activations. signed=False is the
    range [0, 2**b - 1] for inputs that are never negative.
    """
    return _quantize_from(x, alpha.reshape(1), 0, False, bits, rounding, symmetric, signed, gradient_numel)


def quantize_log_step(x: torch.Tensor, log_step_sizes: torch.Tensor, index: int | tuple[int, ...], bits: int,
                      **options) -> torch.Tensor:
    """`quantize` (with its keyword options) for alpha = exp(log_step_sizes[index]), the layers' parametrisation
    of their step sizes: the gradient reaches the log step sizes in the same autograd node (the same values as
    quantize(x, log_step_sizes[index].exp(), ...), to rounding)."""
    return _quantize_from(x, log_step_sizes, index, True, bits, **options)


def _quantize_from(x, steps, index, log_domain: bool, bits: int, rounding: str = "floor", symmetric: bool = True,
                   signed: bool = True, gradient_numel: int | None = None) -> torch.Tensor:
    numel = x.numel() if gradient_numel is None else gradient_numel
    return _LinearQuantize.apply(x, steps, index, log_domain, *_eq2_constants(bits, rounding, symmetric, signed, numel))


@functools.lru_cache(maxsize=4096, typed=True)
def _eq2_constants(bits: int, rounding: str, symmetric: bool, signed: bool, numel: int):
    """(lo, hi, q', LSQ's gradient scale) of a b-bit quantizer, checked and computed once per layer setting."""
    _check_bits(bits)
    _check_rounding(rounding)
    lo, hi = integer_range(bits, symmetric, signed)
    q_prime = "sign" if bits == 1 and signed else rounding
    return lo, hi, q_prime, lsq_gradient_scale(numel, bits, signed)


def quantize_nested(
    x: torch.Tensor,
    alpha: torch.Tensor,
    bits: int,
    max_bits: int,
    *,
    rounding: str = "floor",
    symmetric: bool = True,
    signed: bool = True,
    gradient_numel: int | None = None,
) -> torch.Tensor:
    """Eq. 3-4 (section 4.5 ablation): quantize to max_bits with one alpha, then clip the integers to
    the b-bit range, so every bit-width shares the states of the largest one.

    For signed b = 1 the clipped range would be {0} (m_1 = 0), so binary takes sign of the max-bit integers.
    """
    _check_bits(bits)
    _check_bits(max_bits)
    _check_rounding(rounding)
    if bits > max_bits:
        raise ValueError(f"bits ({bits}) must not exceed max_bits ({max_bits}) in nested quantization.")
    numel = x.numel() if gradient_numel is None else gradient_numel
    alpha = grad_scale(alpha, lsq_gradient_scale(numel, max_bits, signed))
    lo, hi = integer_range(max_bits, symmetric, signed)
    v = torch.clamp(x / alpha, lo, hi)
    levels = floor_pass(v) if rounding == "floor" else round_pass(v)  # Eq. 3: W_n on the integer grid
    if bits == 1 and signed:
        return sign_pass(levels) * alpha
    lo_b, hi_b = integer_range(bits, symmetric, signed)
    return torch.clamp(levels, lo_b, hi_b) * alpha  # Eq. 4: W_i = alpha * clip(W_n, -m_i, m_i)


@dataclass(frozen=True)
class QuantizerOptions:
    """The quantizer variants of sections 4.5-4.6 (defaults: the paper's main method)."""

    rounding: str = "floor"
    symmetric: bool = True
    nesting: str = "scale"  # "scale": one alpha per bit-width (Eq. 2); "clip": Eq. 3-4

    def __post_init__(self) -> None:
        _check_rounding(self.rounding)
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}.")
        if self.nesting not in NESTINGS:
            raise ValueError(f"nesting must be one of {NESTINGS}, got {self.nesting!r}.")

    @classmethod
    def coerce(cls, value: "QuantizerOptions | dict | None") -> "QuantizerOptions":
        """Accept the options object itself, None (defaults) or a plain mapping from a YAML config."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"rounding", "symmetric", "nesting"}
            if unknown:
                raise ValueError(
                    f"quantizer options got unknown key(s) {sorted(unknown)}; use rounding, symmetric, nesting."
                )
            return cls(**value)
        raise ValueError(f"quantizer must be QuantizerOptions or a mapping, got {type(value).__name__}.")

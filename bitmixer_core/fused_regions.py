"""Compiled regions (opt-in): each BN -> (+ shortcut) -> ReLU -> quantizer region of the classic block order
as one `torch.compile`d function, forward and backward fused by inductor; the weight quantizers compiled too.

In a conv_bn_relu ResNet, every switchable conv reads relu(BN(previous conv)) (or relu(BN(conv) + shortcut) at
a block's end) through its activation quantizer. Eagerly that is a chain of element-wise passes over each
activation: BN's statistics and apply, the sum, ReLU, divide-clamp-floor-scale; backward the straight-through
mask, the step size's two dot products, ReLU's mask and BN's backward. Compiled, the quantized tensor is
written in the pass that applies the BN, and the backward reads each tensor about twice. A Stage III step of
ResNet-18 on CPU costs 1.02-1.05x a plain step this way, against 1.09-1.12x eagerly (docs/benchmarks.md).

`compile_fused_regions(model)` switches a ResNet to it; the eager path stays the reference. What a sub-net
draw changes (the Transitional BN entry's tensors, the step size, the bit range lo/hi and LSQ's gradient
scale) reaches the compiled functions as tensor inputs: a new draw is new data, not a recompile (one graph
per region kind and shape, built at the first training step: tens of seconds per process, a C++ compiler
needed). Only training steps with gradients run compiled (evaluation and calibration stay eager), and only
where the eager result is the same function: float32, an unsigned floor quantizer with one step size per
bit-width (the default), Transitional BNs with a momentum; anything else falls back to the eager layers.

The gradients are the eager quantizer's (quantizer._LinearQuantize): straight-through where v = x / alpha is
strictly inside (lo, hi), for alpha g . q / alpha - (g [inside]) . v times LSQ's scale. Inductor orders float
operations its own way (BN's statistics above all), so the results agree with the eager path to rounding,
and floor() can flip where the eager pre-floor value lies within a few ulps of an integer
(tests/core/test_fused_regions.py). Not for double backward (the Hessian search runs eagerly, in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import QuantizedLayerMixin
from .quantizer import integer_range, lsq_gradient_scale
from .transitional_bn import TransitionalBatchNorm2d


class _RegionQuantize(torch.autograd.Function):
    """Eq. 2 with tensor bounds (lo, hi) and gradient scale: traceable by dynamo, fused by inductor."""

    @staticmethod
    def forward(ctx, x, alpha, lo, hi, scale):
        out = torch.clamp(x / alpha, lo, hi).floor() * alpha
        ctx.save_for_backward(x, alpha, out, lo, hi, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, alpha, out, lo, hi, scale = ctx.saved_tensors
        v = x / alpha
        inside = (v > lo) & (v < hi)
        grad_x = torch.where(inside, grad, grad.new_zeros(()))
        grad_alpha = ((grad * out).sum() / alpha - (grad_x * v).sum()) * scale
        return grad_x, grad_alpha.reshape(alpha.shape), None, None, None


def _batch_norm(y, bn):
    weight, bias, running_mean, running_var, factor, eps = bn
    return F.batch_norm(y, running_mean, running_var, weight, bias, True, factor, eps)


def _region_function(y, bn, shortcut, shortcut_bn, quantizers, keep_output: bool):
    """relu(BN(y) [+ shortcut or BN'(shortcut)]), and each following layer's quantized copy of it."""
    z = _batch_norm(y, bn)
    if shortcut is not None:
        z = z + (shortcut if shortcut_bn is None else _batch_norm(shortcut, shortcut_bn))
    r = torch.relu(z)
    quantized = tuple(_RegionQuantize.apply(r, *q) for q in quantizers)
    return ((r,) if keep_output else ()) + quantized


_compiled_region = None
_bounds: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # _constants


def _region():
    global _compiled_region
    if _compiled_region is None:
        # One graph per region kind and shape (ResNet-18: 13); dynamo's default limit is 8 per function.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_region = torch.compile(_region_function, dynamic=False)
    return _compiled_region


def _bn_fusable(norm, y) -> bool:
    """A Transitional BN in a training step with gradients, float32 (as its eager batch_norm_float32)."""
    if not isinstance(norm, TransitionalBatchNorm2d):
        return False
    return (norm.training and torch.is_grad_enabled() and norm.momentum is not None
            and y.dtype == torch.float32 and norm.weight.dtype == torch.float32)


def _quantizer_fusable(layer) -> bool:
    """An unsigned floor quantizer with one step size per bit-width, its step sizes initialised."""
    return (isinstance(layer, QuantizedLayerMixin) and layer.quantize_activations and not layer.signed_input
            and layer.quantizer.nesting == "scale" and layer.quantizer.rounding == "floor"
            and layer._activation_steps_ready and not layer._calibrating)


def _bn_inputs(norm):
    bn = norm.active_entry
    bn.num_batches_tracked.add_(1)
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, norm.momentum, norm.eps


def _constants(device, slot: int, lo: int, hi: int, scale: float):
    """lo, hi, scale as 0-dim tensors on `device`, made once; one set per argument slot (dynamo guards on
    aliasing: two inputs that are one tensor in one call and two in the next would recompile)."""
    key = (device, slot, lo, hi, scale)
    if key not in _bounds:
        _bounds[key] = tuple(torch.tensor(float(v), device=device) for v in key[2:])
    return _bounds[key]


def _quantizer_inputs(layer, numel: int, slot: int):
    bits = layer.bits
    constants = _constants(layer.weight.device, slot, *integer_range(bits, layer.quantizer.symmetric, False),
                           lsq_gradient_scale(numel, bits, False))
    return (layer.log_activation_step_size[layer._bit_index].exp(), *constants)


def _weight_function(weight, alpha, lo, hi, scale):
    return _RegionQuantize.apply(weight, alpha, lo, hi, scale)


_compiled_weight = None


def quantized_weight(layer):
    """layer.quantized_weight(), compiled in a training step for a floor quantizer above 1 bit (else eager)."""
    global _compiled_weight
    q, bits = layer.quantizer, layer.weight_bits
    if (not layer.quantize_weights or q.nesting != "scale" or q.rounding != "floor" or bits == 1
            or not layer.training or not torch.is_grad_enabled() or layer.weight.dtype != torch.float32):
        return layer.quantized_weight()
    if _compiled_weight is None:
        _compiled_weight = torch.compile(_weight_function, dynamic=False)
    constants = _constants(layer.weight.device, 9, *integer_range(bits, q.symmetric, True), lsq_gradient_scale(layer.weight.numel(), bits))
    return _compiled_weight(layer.weight, layer.log_weight_step_size[layer._bit_index].exp(), *constants)


def _try_region(norm, y, shortcut, shortcut_norm, layers, keep_output):
    """(output or None, {layer: its quantized input}) from the compiled region, or None if it cannot run."""
    if not (_bn_fusable(norm, y) and all(_quantizer_fusable(m) for m in layers)):
        return None
    if shortcut_norm is not None and not _bn_fusable(shortcut_norm, shortcut):
        return None
    results = _region()(y, _bn_inputs(norm), shortcut, None if shortcut_norm is None else _bn_inputs(shortcut_norm),
                        tuple(_quantizer_inputs(m, y[0].numel(), i) for i, m in enumerate(layers)), keep_output)
    output = results[0] if keep_output else None
    return output, dict(zip(layers, results[1:] if keep_output else results))


def _conv(conv, x, quantized):
    x = quantized[conv] if conv in quantized else conv.quantized_input(x)
    return conv._conv_forward(x, quantized_weight(conv), conv.bias)


def _block(block, x, quantized, following, keep_output):
    convs = block.main_path()
    out, inner = x, quantized
    for k, (conv, norm) in enumerate(convs[:-1], start=1):
        y = _conv(conv, out, inner)
        fused = _try_region(norm, y, None, None, [convs[k][0]], False)
        if fused is not None:
            out, inner = None, fused[1]
            continue
        out, inner = norm(y), {}
        if not convs[k][0].rectifies_input():
            out = block.relu(out)
    conv, norm = convs[-1]
    y = _conv(conv, out, inner)
    shortcut, shortcut_norm = x, None
    if block.downsample is not None:
        shortcut, shortcut_norm = _conv(block.downsample[0], x, quantized), block.downsample[1]
    fused = _try_region(norm, y, shortcut, shortcut_norm, following, keep_output)
    if fused is not None:
        return fused
    out = norm(y) + (shortcut if shortcut_norm is None else shortcut_norm(shortcut))
    return block.relu(out), {}


def _layers_reading(block):
    """The layers that quantize a block's input: its first conv and its shortcut conv."""
    if block is None:
        return []
    return [block.conv1] + ([] if block.downsample is None else [block.downsample[0]])


def forward(model, x):
    """ResNet.forward of the classic block order, each region compiled where it can be (see the module)."""
    blocks = [b for i in range(1, model.stages + 1) for b in getattr(model, f"layer{i}")]
    y = model.conv1(x)
    fused = None
    if isinstance(model.maxpool, torch.nn.Identity):
        fused = _try_region(model.bn1, y, None, None, _layers_reading(blocks[0]), blocks[0].downsample is None)
    out, quantized = fused if fused is not None else (model.maxpool(model.relu(model.bn1(y))), {})
    for i, block in enumerate(blocks):
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        keep = following is None or following.downsample is None  # an identity shortcut reads the output
        out, quantized = _block(block, out, quantized, _layers_reading(following), keep)
    return model.fc(torch.flatten(model.avgpool(out), 1))


def compile_fused_regions(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Train a classic-order ResNet with its BN -> (+ shortcut) -> ReLU -> quantizer regions compiled (in place;
    enabled=False goes back to the eager path). Returns the model."""
    if getattr(model, "block_order", None) != "conv_bn_relu" or not hasattr(model, "compiled_regions"):
        raise ValueError("compiled regions exist for a Bit-Mixer ResNet in the classic block order (conv_bn_relu); "
                         "build the model with block_order='conv_bn_relu' or leave the regions eager.")
    model.compiled_regions = bool(enabled)
    return model

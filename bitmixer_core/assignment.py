"""Run-time bit assignment: which bit-width every quantized layer uses now.

Switching is O(layers): each layer stores its bit-width as an integer index into its own step-size
vectors, and each Transitional BN an integer index into its entries. Nothing is allocated or copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import nn

from .layers import QuantizedLayerMixin
from .transitional_bn import TransitionalBatchNorm2d


@dataclass(frozen=True)
class BitAssignment:
    """Per-layer bits in the order of `quantized_layers`, and whether weights are quantized (False: Stage I)."""

    bits: tuple[int, ...]
    quantize_weights: bool = True

    @property
    def average_bits(self) -> float:
        return sum(self.bits) / len(self.bits) if self.bits else 0.0


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayerMixin]]:
    """The switchable quantized layers, in forward (registration) order; fixed-precision ones excluded."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayerMixin) and m.switchable]


def _all_quantized(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, QuantizedLayerMixin)]


def refresh_transitions(model: nn.Module) -> None:
    """Point every wired Transitional BN at the entry of its layers' current bits."""
    for m in model.modules():
        if isinstance(m, TransitionalBatchNorm2d):
            m.refresh()


def _check_bits_for(name: str, layer: QuantizedLayerMixin, bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in layer.bit_widths.activations:
        raise ValueError(
            f"layer {name!r} was built for bit-widths {layer.bit_widths.activations}, got {bits!r}."
        )


def set_bits(model: nn.Module, spec: int | Mapping[str, int] | Sequence[int]) -> None:
    """Set the bit-width of quantized layers: an int (every layer), a mapping name -> bits (the named
    layers), or a sequence aligned with `quantized_layers(model)`. Validates everything before changing
    anything; a bad name or bit-width raises ValueError naming it."""
    layers = quantized_layers(model)
    if isinstance(spec, bool):
        raise ValueError(f"bits must be an int, a mapping or a sequence, got {spec!r}.")
    if isinstance(spec, int):
        plan = [(n, m, spec) for n, m in layers]
    elif isinstance(spec, Mapping):
        by_name = dict(layers)
        plan = []
        for name, bits in spec.items():
            if name not in by_name:
                sample = ", ".join(n for n, _ in layers[:3])
                raise ValueError(
                    f"{name!r} is not a switchable quantized layer of this model; names look like {sample}, ..."
                    " (see quantized_layers(model))."
                )
            plan.append((name, by_name[name], bits))
    else:
        spec = list(spec)
        if len(spec) != len(layers):
            raise ValueError(
                f"a bit-width sequence must have one entry per quantized layer ({len(layers)}), got {len(spec)}."
            )
        plan = [(n, m, b) for (n, m), b in zip(layers, spec)]
    for name, layer, bits in plan:
        _check_bits_for(name, layer, bits)
    for _, layer, bits in plan:
        layer.set_bit_width(bits)
    refresh_transitions(model)


def get_bits(model: nn.Module) -> dict[str, int]:
    return {n: m.bits for n, m in quantized_layers(model)}


def residual_blocks(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(block name, names of its quantized layers) in forward order. A block is a module whose class sets
    `bitmixer_block = True`; a quantized layer outside every block forms a block of its own."""
    blocks: list[tuple[str, list[str]]] = []
    block_prefixes: list[str] = []
    for name, m in model.named_modules():
        if getattr(type(m), "bitmixer_block", False):
            blocks.append((name, []))
            block_prefixes.append(name + ".")
    for name, _ in quantized_layers(model):
        for (block_name, members), prefix in zip(blocks, block_prefixes):
            if name.startswith(prefix):
                members.append(name)
                break
        else:
            blocks.append((name, [name]))
    order = {n: i for i, (n, _) in enumerate(quantized_layers(model))}
    blocks = [(b, members) for b, members in blocks if members]
    blocks.sort(key=lambda item: order[item[1][0]])
    return blocks


def set_block_bits(model: nn.Module, spec: Mapping[str, int] | Sequence[int]) -> None:
    """All layers of a residual block share one bit-width: {block_name: bits} or a list aligned with
    `residual_blocks(model)`."""
    blocks = residual_blocks(model)
    if isinstance(spec, Mapping):
        by_block = dict(blocks)
        unknown = [b for b in spec if b not in by_block]
        if unknown:
            raise ValueError(
                f"{unknown[0]!r} is not a residual block of this model; see residual_blocks(model)."
            )
        items = [(by_block[b], bits) for b, bits in spec.items()]
    else:
        spec = list(spec)
        if len(spec) != len(blocks):
            raise ValueError(f"a block bit-width sequence needs {len(blocks)} entries, got {len(spec)}.")
        items = [(members, bits) for (_, members), bits in zip(blocks, spec)]
    set_bits(model, {name: bits for members, bits in items for name in members})


def set_quantization(model: nn.Module, weights: bool, activations: bool) -> None:
    """FP32 (False, False), Stage I (weights=False, activations=True) or Stages II-III (True, True).
    Applies to every quantized layer, the fixed-precision first/last ones included."""
    for m in _all_quantized(model):
        m.quantize_weights = bool(weights)
        m.quantize_activations = bool(activations)
    refresh_transitions(model)


def apply_assignment(model: nn.Module, assignment: BitAssignment) -> None:
    """Switch the model to a sampled sub-net (activations are always quantized in Stages I-III)."""
    for m in _all_quantized(model):
        m.quantize_weights = assignment.quantize_weights
        m.quantize_activations = True
    set_bits(model, list(assignment.bits))

"""Run-time assignment: set_bits / get_bits / block form, error messages, and no allocation."""

import pytest
import torch

from bitmixer_core import (BitAssignment, apply_assignment, get_bits, quantized_layers, residual_blocks,
                           set_bits, set_block_bits, set_quantization)


def test_set_bits_accepts_int_mapping_and_sequence(tiny):
    """An int sets every layer, a mapping only the named layers, a sequence follows quantized_layers."""
    model, _ = tiny
    names = [n for n, _ in quantized_layers(model)]
    set_bits(model, 2)
    assert set(get_bits(model).values()) == {2}
    set_bits(model, {names[0]: 4})
    assert get_bits(model)[names[0]] == 4 and get_bits(model)[names[1]] == 2
    seq = [2, 3, 4] * (len(names) // 3) + [2] * (len(names) % 3)
    set_bits(model, seq)
    assert list(get_bits(model).values()) == seq


def test_bad_layer_name_or_bit_width_raises_value_error_naming_it(tiny):
    """A name that is not a quantized layer, or bits the layer was not built for, is named in the error,
    and nothing is changed."""
    model, _ = tiny
    set_bits(model, 3)
    with pytest.raises(ValueError, match="'layer9.conv'"):
        set_bits(model, {"layer9.conv": 2})
    with pytest.raises(ValueError, match=r"'layer1.0.conv2'.*\(2, 3, 4\), got 5"):
        set_bits(model, {"layer1.0.conv1": 2, "layer1.0.conv2": 5})
    assert set(get_bits(model).values()) == {3}
    with pytest.raises(ValueError, match="one entry per quantized layer"):
        set_bits(model, [2, 3])
    with pytest.raises(ValueError, match="'fc'"):
        set_bits(model, {"fc": 2})


def test_block_level_assignment_shares_one_draw_per_block(tiny):
    """set_block_bits gives every layer of a residual block the block's bit-width."""
    model, _ = tiny
    blocks = residual_blocks(model)
    assert [b for b, _ in blocks] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert "layer2.0.downsample.0" in dict(blocks)["layer2.0"]  # the shortcut conv (classic order: before its BN)
    set_block_bits(model, [2, 3, 4, 2])
    bits = get_bits(model)
    for (_, members), b in zip(blocks, [2, 3, 4, 2]):
        assert {bits[n] for n in members} == {b}
    with pytest.raises(ValueError, match="'layer7.0'"):
        set_block_bits(model, {"layer7.0": 2})


def test_switching_allocates_nothing(tiny):
    """Switching bits or quantization mode keeps every parameter and buffer where it was, adds none."""
    model, images = tiny
    def storage():
        return {k: v.data_ptr() for k, v in list(model.named_parameters()) + list(model.named_buffers())}
    before = storage()
    names = [n for n, _ in quantized_layers(model)]
    for b in (2, 3, 4):
        set_bits(model, b)
        set_quantization(model, weights=b != 3, activations=True)
        apply_assignment(model, BitAssignment(bits=tuple([b, 2, 4] * len(names))[: len(names)]))
        set_block_bits(model, [b] * len(residual_blocks(model)))
    assert storage() == before
    model(images)
    assert storage() == before

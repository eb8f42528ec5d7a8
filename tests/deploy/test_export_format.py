"""Export format pieces that need no model registry: bit packing, lower-bit recovery, integrity checks."""
import numpy as np
import pytest
import torch
from torch import nn

from bitmixer_core import export as E
from bitmixer_core.layers import QConv2d, QLinear


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_pack_unpack_round_trip_uses_bits_per_value(bits):
    """Packing n-bit integers must use ceil(count*n/8) bytes (two 4-bit values per byte) and invert exactly."""
    rng = np.random.default_rng(bits)
    low = -(2 ** (bits - 1))
    values = rng.integers(low, low + 2**bits, size=1001)
    packed = E.pack_integers(values, bits, low=low)
    assert len(packed) == -(-1001 * bits // 8)
    assert np.array_equal(E.unpack_integers(packed, bits, 1001, low=low), values)


def test_packing_refuses_values_outside_the_bit_range():
    """A value that does not fit in n bits must not be silently wrapped."""
    with pytest.raises(ValueError, match="cannot be packed in 2 bits"):
        E.pack_integers(np.array([0, 4]), 2, low=0)


def _layer(weights, rounding="floor", seed=0):
    torch.manual_seed(seed)
    layer = QConv2d(16, 32, 3, bits={"weights": weights, "activations": (2, 3, 4)}, quantizer={"rounding": rounding})
    with torch.no_grad():  # learned step sizes are not nested by powers of two
        layer.log_weight_step_size.add_((torch.rand(3) * 0.5 + 0.75).log())
    return layer


def _round_trip(layer, mode):
    segments = E._Segments()
    entry = E._encode_weight(layer, mode, segments)
    payload = memoryview(segments.buffer.getvalue())
    grids = E._layer_grids(layer)
    return entry, E._decode_weight(entry, grids, layer.weight.numel(), payload).reshape(layer.weight.shape)


@pytest.mark.parametrize("weights,rounding,seed", [
    ((2, 3, 4), "floor", 0), ((1, 3, 4), "floor", 0), ((2, 3, 4), "round", 0), ((2, 3, 4), "floor", 1),
])
def test_exact_mode_reproduces_every_bit_width_from_packed_integers(weights, rounding, seed):
    """Rebuilt weights quantize to exactly the trained integers at every weight bit-width, none stored
    verbatim."""
    layer = _layer(weights, rounding, seed=seed)
    entry, rebuilt = _round_trip(layer, "exact")
    assert entry["verbatim"]["count"] == 0
    original = layer.weight.detach().clone()
    for b in (2, 3, 4):
        layer.set_bit_width(b)
        want = layer.quantized_weight().detach().clone()
        with torch.no_grad():
            layer.weight.copy_(rebuilt)
        got = layer.quantized_weight().detach().clone()
        with torch.no_grad():
            layer.weight.copy_(original)
        assert torch.equal(got, want), f"bit-width {b} differs"


def test_derived_mode_keeps_the_top_bit_width_and_reports_lower_agreement():
    """Derivation only from n-bit integers (section 3.1): the n-bit levels are exact, the lower ones are measured."""
    layer = _layer((2, 3, 4))
    entry, rebuilt = _round_trip(layer, "derived")
    assert entry["lower"] == []
    grids = E._layer_grids(layer)
    assert torch.equal(grids[-1].level(rebuilt.reshape(-1)), grids[-1].level(layer.weight.detach().reshape(-1)))
    agreement = E.derived_weight_agreement(nn.Sequential(layer))
    assert agreement[4] == 1.0 and 0.5 < agreement[2] <= 1.0


def test_derivation_is_exact_when_step_sizes_are_nested_by_powers_of_two():
    """floor(w/(2a)) = floor(floor(w/a)/2): with alpha_b = 2^(n-b) alpha_n the derived levels equal the direct ones."""
    layer = _layer((2, 3, 4))
    with torch.no_grad():
        layer.log_weight_step_size.copy_(torch.tensor([0.04, 0.02, 0.01]).log())
    assert set(E.derived_weight_agreement(nn.Sequential(layer)).values()) == {1.0}


def _write(tmp_path):
    model = nn.Sequential(_layer((2, 3, 4)), nn.Flatten(), QLinear(4, 2, bits=(8,), switchable=False))
    path = tmp_path / "model.bmx"
    report = E.export_meta_network(model, "none", {"num_classes": 2}, path)
    return path, report


def test_artifact_is_small_and_leaves_no_temporary_file(tmp_path):
    """The 4-bit artifact is far below the FP32 state dict, and only the final file is left in the folder."""
    path, report = _write(tmp_path)
    assert report.artifact_bytes == path.stat().st_size
    assert report.ratio < 0.3
    assert [p.name for p in tmp_path.iterdir()] == ["model.bmx"]
    header, _ = E.read_artifact(path)
    assert header["lower_bits"] == "exact"


def test_truncated_corrupted_and_foreign_files_are_refused(tmp_path):
    """Truncation, one flipped byte and a non-artifact each raise ArtifactError naming the problem."""
    path, _ = _write(tmp_path)
    blob = path.read_bytes()
    (tmp_path / "cut.bmx").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(E.ArtifactError, match="is truncated"):
        E.read_artifact(tmp_path / "cut.bmx")
    flipped = bytearray(blob)
    flipped[len(blob) - 100] ^= 0x01
    (tmp_path / "flip.bmx").write_bytes(bytes(flipped))
    with pytest.raises(E.ArtifactError, match="checksum mismatch"):
        E.read_artifact(tmp_path / "flip.bmx")
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 not an artifact")
    with pytest.raises(E.ArtifactError, match="not a Bit-Mixer artifact"):
        E.read_artifact(tmp_path / "ckpt.pt")


def test_clip_nesting_needs_only_the_n_bit_integers():
    """With Eq. 3-4 nesting every bit-width is a clip of the n-bit integers: exact with no extra bits."""
    torch.manual_seed(0)
    layer = QConv2d(8, 8, 3, bits=(2, 3, 4), quantizer={"nesting": "clip"})
    entry, rebuilt = _round_trip(layer, "exact")
    assert entry["lower"] == [] and entry["verbatim"]["count"] == 0
    original = layer.weight.detach().clone()
    for b in (2, 3, 4):
        layer.set_bit_width(b)
        want = layer.quantized_weight().detach().clone()
        with torch.no_grad():
            layer.weight.copy_(rebuilt)
        assert torch.equal(layer.quantized_weight().detach(), want)
        with torch.no_grad():
            layer.weight.copy_(original)

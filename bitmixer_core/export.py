"""A self-contained, compact artifact for a trained meta-network (paper section 3.1's storage claim).

What is stored
- For every quantized layer: its weights as the n-bit integers of its largest weight bit-width n, packed
  (two 4-bit values per byte, eight 1-bit values, ...), instead of 32-bit floats.
- Everything else of the ``state_dict`` as it is: the step sizes of every bit-width, every Transitional BN
  entry (gamma, beta, running statistics), biases, the full-precision layers if any.
- The architecture: ``model_name`` and ``build_kwargs`` for ``build_model``.

Lower bit-widths from the n-bit integers (section 3.1). With floor rounding the paper says W_i can be
obtained from W_{i+1} without the real weights. That holds exactly only when the step sizes are nested by
powers of two (alpha_b = 2^(n-b) alpha_n: then floor(w/alpha_b) = floor(floor(w/alpha_n) / 2^(n-b))).
With a learned alpha per bit-width, the n-bit integer z only says that w lies in the cell
[z alpha_n, (z+1) alpha_n); the b-bit integer floor(w / alpha_b) is then one of the few levels that cell
overlaps. Two encodings, chosen at export time:
- ``lower_bits="derived"``: the paper's claim, nothing more is stored; the loader puts each weight at the
  middle of its n-bit cell, so lower bit-widths are re-quantized from the n-bit values. Smallest; lower
  bit-widths may differ from the trained model (measure it: ``derived_weight_agreement``).
- ``lower_bits="exact"`` (default): for each lower bit-width, from the largest down, the few bits that say
  which of the overlapped levels the real weight chose, only for the weights whose cell overlaps more
  than one (both sides compute which ones from what is already decoded). The loader then puts each weight
  inside the intersection of all its cells, so every bit-width quantizes to exactly the trained integers.
  The encoder checks that with the same quantizer and stores the rare float edge cases verbatim.

Integrity: magic, format version, declared sizes and a SHA-256 of everything; a damaged or truncated file
is refused with a sentence saying what is wrong. Files are written to a temporary name and renamed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import durable
from .layers import QuantizedLayerMixin
from .quantizer import integer_range

__all__ = [
    "ArtifactError",
    "ExportReport",
    "export_meta_network",
    "load_meta_network",
    "read_artifact",
    "pack_integers",
    "unpack_integers",
    "integer_weights",
    "derived_weight_agreement",
    "fp32_state_dict_bytes",
]

MAGIC = b"BITMIXR\x00"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_BYTES = 32
LOWER_BITS_MODES = ("exact", "derived")


class ArtifactError(ValueError):
    """The file is not a readable Bit-Mixer artifact (wrong kind, damaged, truncated, newer format)."""


# --------------------------------------------------------------------------------------------------
# bit packing
def pack_integers(values: torch.Tensor | np.ndarray, bits: int, *, low: int) -> bytes:
    """Pack integers from [low, low + 2^bits) into ceil(count * bits / 8) bytes (little-endian bit order)."""
    v = np.asarray(values, dtype=np.int64).reshape(-1) - low
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values outside [{low}, {low + (1 << bits) - 1}] cannot be packed in {bits} bits.")
    if bits == 0 or v.size == 0:
        return b""
    planes = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # (count, bits), LSB first
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_integers(data: bytes, bits: int, count: int, *, low: int) -> np.ndarray:
    """Inverse of ``pack_integers``: ``count`` int64 values."""
    if bits == 0 or count == 0:
        return np.full(count, low, dtype=np.int64)
    needed = math.ceil(count * bits / 8)
    if len(data) < needed:
        raise ArtifactError(f"a packed tensor needs {needed} bytes but only {len(data)} are there.")
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8, count=needed), bitorder="little")[: count * bits]
    planes = flat.reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=1) + low


# --------------------------------------------------------------------------------------------------
# the integer view of Eq. 2 (what the layer's quantizer computes, before multiplying by alpha)
@dataclass(frozen=True)
class _Grid:
    """One weight bit-width of one layer: q(x) = alpha * level(x)."""

    bits: int
    alpha: float
    rounding: str
    symmetric: bool

    @property
    def range(self) -> tuple[int, int]:
        return integer_range(self.bits, self.symmetric)

    def level(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.range
        v = torch.clamp(x / torch.tensor(self.alpha, dtype=x.dtype), lo, hi)
        if self.bits == 1:
            return torch.where(v >= 0, 1.0, -1.0).to(torch.int64)
        return (v.floor() if self.rounding == "floor" else v.round()).to(torch.int64)

    def cell(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lower, upper) bounds of the real values that quantize to level z (infinite at the clipped ends).

        A learned step size can turn negative (LSQ does not constrain its sign); x / alpha then runs the
        other way, so the cell is mirrored. Whether an end is open or closed is left to the encoder's check.
        """
        lo, hi = self.range
        a = torch.tensor(abs(self.alpha), dtype=torch.float64)
        zf = z.to(torch.float64)
        if self.bits == 1:
            lower = torch.where(z > 0, 0.0, -math.inf).to(torch.float64)
            upper = torch.where(z > 0, math.inf, 0.0).to(torch.float64)
        else:
            shift = 0.0 if self.rounding == "floor" else 0.5
            lower = torch.where(z <= lo, -math.inf, (zf - shift) * a)
            upper = torch.where(z >= hi, math.inf, (zf + 1 - shift) * a)
        if self.alpha < 0:
            lower, upper = -upper, -lower
        return lower, upper

    def levels_over(self, lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lowest and highest level reachable for x in (lower, upper) (the level is monotone in x)."""
        lo_level, hi_level = self.range
        if self.alpha < 0:  # levels fall as x rises
            lower, upper = -upper, -lower
        grid = _Grid(self.bits, abs(self.alpha), self.rounding, self.symmetric)
        finite_low = torch.isfinite(lower)
        c_lo = torch.where(finite_low, grid.level(torch.where(finite_low, lower, 0.0).float()), lo_level)
        just_below = torch.nextafter(upper.float(), torch.tensor(-math.inf))
        finite_up = torch.isfinite(upper)
        c_hi = torch.where(finite_up, grid.level(torch.where(finite_up, just_below, 0.0)), hi_level)
        return c_lo, torch.maximum(c_hi, c_lo)


def _layer_grids(layer: QuantizedLayerMixin) -> list[_Grid]:
    """The weight grids of a layer, one per rank of its bit set (largest last)."""
    q = layer.quantizer
    steps = layer.weight_step_size.detach().float().tolist()  # the layer divides by alpha as it is
    if q.nesting == "clip":
        # Eq. 3-4: every bit-width clips the n-bit integers of the one largest alpha, so the n-bit grid
        # alone determines all of them (nothing to choose for the lower bit-widths).
        return [_Grid(layer.bit_widths.weights[-1], steps[-1], q.rounding, q.symmetric)]
    return [_Grid(b, steps[i], q.rounding, q.symmetric) for i, b in enumerate(layer.bit_widths.weights)]


def integer_weights(layer: QuantizedLayerMixin, rank: int | None = None) -> torch.Tensor:
    """The integer levels of a layer's weights at a bit-width rank (default: the largest)."""
    grids = _layer_grids(layer)
    grid = grids[-1 if rank is None else rank]
    return grid.level(layer.weight.detach().float())


# --------------------------------------------------------------------------------------------------
# encoding of one quantized layer's weights
def _descending_lower_ranks(grids: list[_Grid]) -> list[int]:
    # largest first: each decoded bit-width narrows the cell the next one is chosen in
    return sorted(range(len(grids) - 1), key=lambda r: -grids[r].bits)


def _width(count_max: int) -> int:
    return max(0, math.ceil(math.log2(count_max))) if count_max > 1 else 0


def _midpoint(lower: torch.Tensor, upper: torch.Tensor, half_step: float) -> torch.Tensor:
    """A point inside every [lower, upper): the middle, or half a step inside a one-sided interval."""
    mid = (lower + upper) / 2
    mid = torch.where(torch.isinf(lower) & torch.isfinite(upper), upper - half_step, mid)
    mid = torch.where(torch.isinf(upper) & torch.isfinite(lower), lower + half_step, mid)
    return mid.float()


class _Segments:
    """Byte segments appended to the payload, referenced from the header by offset."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def add(self, data: bytes) -> list[int]:
        offset = self.buffer.tell()
        self.buffer.write(data)
        return [offset, len(data)]


def _encode_weight(layer: QuantizedLayerMixin, lower_bits: str, segments: _Segments) -> dict[str, Any]:
    grids = _layer_grids(layer)
    weight = layer.weight.detach().float().reshape(-1)
    top = grids[-1]
    z_top = top.level(weight)
    entry: dict[str, Any] = {
        "bits": top.bits,
        "low": top.range[0],
        "integers": segments.add(pack_integers(z_top, top.bits if top.bits > 1 else 1, low=top.range[0])),
        "lower": [],
    }
    lower, upper = top.cell(z_top)
    if lower_bits == "exact":
        for rank in _descending_lower_ranks(grids):
            grid = grids[rank]
            c_lo, c_hi = grid.levels_over(lower, upper)
            counts = c_hi - c_lo + 1
            ambiguous = counts > 1
            width = _width(int(counts.max()))
            z_direct = grid.level(weight)
            offset = torch.clamp(z_direct - c_lo, min=0)
            offset = torch.minimum(offset, counts - 1)  # a float edge case falls back to a stored weight
            entry["lower"].append({
                "rank": rank,
                "width": width,
                "choices": segments.add(pack_integers(offset[ambiguous], width, low=0)),
            })
            z_b = c_lo + offset
            cell_lo, cell_up = grid.cell(z_b)
            lower, upper = torch.maximum(lower, cell_lo), torch.minimum(upper, cell_up)
    rebuilt = _midpoint(lower, upper, 0.5 * abs(top.alpha))
    # Check with the quantizer itself; what does not reproduce (float edges) is stored as it is.
    ranks = range(len(grids)) if lower_bits == "exact" else [len(grids) - 1]
    wrong = torch.zeros_like(weight, dtype=torch.bool)
    for r in ranks:
        wrong |= grids[r].level(rebuilt) != grids[r].level(weight)
    index = torch.nonzero(wrong).reshape(-1)
    entry["verbatim"] = {
        "count": int(index.numel()),
        "index": segments.add(index.numpy().astype("<i8").tobytes()),
        "values": segments.add(weight[index].numpy().astype("<f4").tobytes()),
    }
    return entry


def _decode_weight(entry: dict[str, Any], grids: list[_Grid], numel: int, payload: memoryview) -> torch.Tensor:
    def segment(ref):
        offset, length = ref
        return bytes(payload[offset: offset + length])

    top = grids[-1]
    z_top = torch.from_numpy(unpack_integers(segment(entry["integers"]), top.bits if top.bits > 1 else 1, numel,
                                             low=entry["low"]))
    lower, upper = top.cell(z_top)
    for item in entry["lower"]:
        grid = grids[item["rank"]]
        c_lo, c_hi = grid.levels_over(lower, upper)
        ambiguous = (c_hi - c_lo + 1) > 1
        offset = torch.zeros(numel, dtype=torch.int64)
        picks = unpack_integers(segment(item["choices"]), item["width"], int(ambiguous.sum()), low=0)
        offset[ambiguous] = torch.from_numpy(picks)
        cell_lo, cell_up = grid.cell(c_lo + offset)
        lower, upper = torch.maximum(lower, cell_lo), torch.minimum(upper, cell_up)
    weight = _midpoint(lower, upper, 0.5 * abs(top.alpha))
    verbatim = entry["verbatim"]
    if verbatim["count"]:
        index = torch.from_numpy(np.frombuffer(segment(verbatim["index"]), dtype="<i8").copy())
        weight[index] = torch.from_numpy(np.frombuffer(segment(verbatim["values"]), dtype="<f4").copy())
    return weight


# --------------------------------------------------------------------------------------------------
# the artifact
@dataclass(frozen=True)
class ExportReport:
    """Sizes of an export, in bytes, and how many weights needed a verbatim copy."""

    artifact_bytes: int
    fp32_state_dict_bytes: int
    packed_weight_bytes: int
    lower_bit_choice_bytes: int
    verbatim_weights: int
    quantized_weights: int

    @property
    def ratio(self) -> float:
        return self.artifact_bytes / self.fp32_state_dict_bytes


def fp32_state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` in float32: what the artifact is compared against."""
    buffer = io.BytesIO()
    torch.save({k: (v.float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}, buffer)
    return buffer.tell()


def _plain(value: Any) -> Any:
    """build_kwargs as JSON: dataclasses (BitWidths, QuantizerOptions) become mappings, tuples lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"build_kwargs value {value!r} is not plain data; pass lists, numbers, strings and mappings.")


def export_meta_network(
    model: nn.Module, model_name: str, build_kwargs: dict[str, Any], path: str | os.PathLike, *,
    lower_bits: str = "exact",
) -> ExportReport:
    """Write ``model`` (built by ``build_model(model_name, **build_kwargs)``) to ``path`` atomically."""
    if lower_bits not in LOWER_BITS_MODES:
        raise ValueError(f"lower_bits must be one of {LOWER_BITS_MODES}, got {lower_bits!r}.")
    segments = _Segments()
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayerMixin)}
    packed_names = {f"{name}.weight" for name in quantized}
    tensors = []
    packed_bytes = choice_bytes = verbatim = total_quantized = 0
    for key, value in model.state_dict().items():
        if key in packed_names:
            layer = quantized[key[: -len(".weight")]]
            entry = _encode_weight(layer, lower_bits, segments)
            packed_bytes += entry["integers"][1]
            choice_bytes += sum(item["choices"][1] for item in entry["lower"])
            verbatim += entry["verbatim"]["count"]
            total_quantized += value.numel()
            tensors.append({"name": key, "kind": "packed_weight", "shape": list(value.shape), **entry})
        else:
            array = value.detach().cpu().contiguous().numpy()
            tensors.append({"name": key, "kind": "raw", "dtype": array.dtype.str, "shape": list(array.shape),
                            "data": segments.add(array.tobytes())})
    payload = segments.buffer.getvalue()
    header = json.dumps({
        "format": "bitmixer-meta-network",
        "model_name": model_name,
        "build_kwargs": _plain(build_kwargs),
        "lower_bits": lower_bits,
        "payload_bytes": len(payload),
        "tensors": tensors,
    }, separators=(",", ":")).encode()
    body = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header + payload
    blob = body + hashlib.sha256(body).digest()
    durable.write_bytes(path, blob)
    return ExportReport(len(blob), fp32_state_dict_bytes(model), packed_bytes, choice_bytes, verbatim, total_quantized)


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview]:
    """Check and split an artifact into (header, payload); ArtifactError says what is wrong with it."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    what = f"{path} "
    if len(blob) < _PREAMBLE.size or blob[:8] != MAGIC:
        raise ArtifactError(what + "is not a Bit-Mixer artifact (bad magic bytes); pass a file written by pipelines/export.py.")
    _, version, header_len = _PREAMBLE.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise ArtifactError(what + f"has format version {version}, this code reads version {FORMAT_VERSION}; "
                            "use the matching bitmixer release or re-export the model.")
    header_end = _PREAMBLE.size + header_len
    if len(blob) < header_end + _DIGEST_BYTES:
        raise ArtifactError(what + f"is truncated ({len(blob)} bytes, its header alone needs {header_end + _DIGEST_BYTES}); "
                            "copy or export it again.")
    body, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
    try:
        header = json.loads(blob[_PREAMBLE.size:header_end])
        expected = header_end + int(header["payload_bytes"]) + _DIGEST_BYTES
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(what + "is corrupted (its header does not parse); copy or export it again.") from None
    if len(blob) != expected:
        state = "truncated" if len(blob) < expected else "longer than it declares"
        raise ArtifactError(what + f"is {state} ({len(blob)} bytes, expected {expected}); copy or export it again.")
    if hashlib.sha256(body).digest() != digest:
        raise ArtifactError(what + "is corrupted (SHA-256 checksum mismatch); copy or export it again.")
    return header, memoryview(blob)[header_end:header_end + int(header["payload_bytes"])]


def load_meta_network(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the meta-network from an artifact; returns (model in eval mode, header). Any assignment runs."""
    from .models import build_model  # the registry is only needed to load

    header, payload = read_artifact(path)
    model = build_model(header["model_name"], **header["build_kwargs"])
    state: dict[str, torch.Tensor] = {}
    for t in header["tensors"]:
        if t["kind"] == "raw":
            offset, length = t["data"]
            array = np.frombuffer(bytes(payload[offset:offset + length]), dtype=np.dtype(t["dtype"]))
            state[t["name"]] = torch.from_numpy(array.copy()).reshape(t["shape"])
    model.load_state_dict(state, strict=False)  # step sizes first: the weight grids need them
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLayerMixin)}
    for t in header["tensors"]:
        if t["kind"] == "packed_weight":
            layer = layers[t["name"][: -len(".weight")]]
            numel = int(np.prod(t["shape"]))
            state[t["name"]] = _decode_weight(t, _layer_grids(layer), numel, payload).reshape(t["shape"])
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, header


# --------------------------------------------------------------------------------------------------
# measuring the paper's derivation
@torch.no_grad()
def derived_weight_agreement(model: nn.Module) -> dict[int, float]:
    """Per weight bit-width: fraction of weights whose level derived from the n-bit integers (middle of the
    n-bit cell, re-quantized) equals the directly quantized level. 1.0 means section 3.1 holds exactly."""
    agree: dict[int, list[int]] = {}
    for _, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLayerMixin)]:
        grids = _layer_grids(layer)
        weight = layer.weight.detach().float().reshape(-1)
        top = grids[-1]
        lower, upper = top.cell(top.level(weight))
        rebuilt = _midpoint(lower, upper, 0.5 * abs(top.alpha))
        for grid in grids:
            same = int((grid.level(rebuilt) == grid.level(weight)).sum())
            acc = agree.setdefault(grid.bits, [0, 0])
            acc[0] += same
            acc[1] += weight.numel()
    return {bits: same / total for bits, (same, total) in sorted(agree.items())}

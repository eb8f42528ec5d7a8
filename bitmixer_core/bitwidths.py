"""The bit sets a meta-network is trained for: one for weights, one for activations, same length.

A layer's *bit-width* is its activation bit-width; its weight bit-width is the entry at the same rank in
`weights` (the paper's act {2,3,4} / weights {1,3,4} model: a layer "at 2 bits" is A2/W1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


def _as_bit_tuple(values: Iterable[int], what: str) -> tuple[int, ...]:
    try:
        bits = tuple(values)
    except TypeError:
        raise ValueError(f"{what} bit-widths must be a list of integers, got {values!r}.") from None
    if not bits:
        raise ValueError(f"{what} bit-widths must not be empty.")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"{what} bit-widths must be integers from 1 to 8, got {b!r} in {bits}.")
    if list(bits) != sorted(set(bits)):
        raise ValueError(f"{what} bit-widths must be sorted and unique, got {bits}.")
    return bits


@dataclass(frozen=True)
class BitWidths:
    weights: tuple[int, ...] = (2, 3, 4)
    activations: tuple[int, ...] = (2, 3, 4)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _as_bit_tuple(self.weights, "weight"))
        object.__setattr__(self, "activations", _as_bit_tuple(self.activations, "activation"))
        if len(self.weights) != len(self.activations):
            raise ValueError(
                f"weights {self.weights} and activations {self.activations} must list as many bit-widths; "
                "a layer's weight bits are the entry at the same rank as its activation bits."
            )

    @classmethod
    def same(cls, bits: Iterable[int]) -> "BitWidths":
        bits = tuple(bits)
        return cls(weights=bits, activations=bits)

    @classmethod
    def coerce(cls, value: "BitWidths | Iterable[int] | dict") -> "BitWidths":
        """Accept BitWidths, a list like [2, 3, 4] (same for both) or {"weights": [...], "activations": [...]}."""
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"weights", "activations"}
            if unknown or "activations" not in value:
                raise ValueError(
                    f"bits mapping must have keys 'activations' and optionally 'weights', got {sorted(value)}."
                )
            acts = tuple(value["activations"])
            return cls(weights=tuple(value.get("weights", acts)), activations=acts)
        if isinstance(value, int):
            return cls.same((value,))
        return cls.same(value)

    def __len__(self) -> int:
        return len(self.activations)

    @property
    def max_bits(self) -> int:
        return self.activations[-1]

    def index(self, bits: int) -> int:
        """Rank of an activation bit-width; ValueError if it is not in the set."""
        try:
            return self.activations.index(bits)
        except ValueError:
            raise ValueError(f"bit-width {bits!r} is not one of {self.activations}.") from None

    def weight_bits(self, bits: int) -> int:
        """Weight bit-width paired with activation bit-width `bits`."""
        return self.weights[self.index(bits)]

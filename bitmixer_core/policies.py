"""Stage policies (section 3.3): which sub-net trains at each iteration.

- Stage I:  weights real-valued; one bit-width b, drawn uniformly, for every layer's activations.
- Stage II: weights and activations quantized; one b for every layer.
- Stage III: with probability sigma the Stage II draw; otherwise every layer (or every residual block)
  draws its own b independently. 1 - sigma ramps from 0 to k over `ramp_epochs`, then stays at k.

All randomness comes from the torch.Generator passed to `sample`, so data-parallel ranks whose generators
share a seed draw the same sub-net at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .assignment import BitAssignment
from .bitwidths import BitWidths

RAMP_SHAPES = ("linear", "cosine")
GRANULARITIES = ("layer", "block")


@dataclass(frozen=True)
class StagePolicy:
    stage: int
    bits: BitWidths = BitWidths()
    k: float = 0.75  # final probability of a layer-wise draw (1 - sigma), Stage III only
    ramp_epochs: float = 80.0
    ramp_shape: str = "linear"
    granularity: str = "layer"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", BitWidths.coerce(self.bits))
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}.")
        if not 0.0 <= self.k <= 1.0:
            raise ValueError(f"k (final probability of layer-wise draws) must lie in [0, 1], got {self.k!r}.")
        if self.ramp_epochs < 0:
            raise ValueError(f"ramp_epochs must be >= 0, got {self.ramp_epochs!r}.")
        if self.ramp_shape not in RAMP_SHAPES:
            raise ValueError(f"ramp_shape must be one of {RAMP_SHAPES}, got {self.ramp_shape!r}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}.")

    @classmethod
    def stage_one(cls, bits=BitWidths()) -> "StagePolicy":
        return cls(stage=1, bits=bits)

    @classmethod
    def stage_two(cls, bits=BitWidths()) -> "StagePolicy":
        return cls(stage=2, bits=bits)

    @classmethod
    def stage_three(cls, bits=BitWidths(), k: float = 0.75, ramp_epochs: float = 80.0,
                    ramp_shape: str = "linear", granularity: str = "layer") -> "StagePolicy":
        return cls(stage=3, bits=bits, k=k, ramp_epochs=ramp_epochs, ramp_shape=ramp_shape,
                   granularity=granularity)

    def layer_wise_probability(self, epoch: float) -> float:
        """1 - sigma(epoch): 0 in Stages I-II; in Stage III ramps from 0 to k over ramp_epochs."""
        if self.stage != 3:
            return 0.0
        if self.ramp_epochs == 0 or epoch >= self.ramp_epochs:
            return self.k
        t = max(float(epoch), 0.0) / self.ramp_epochs
        if self.ramp_shape == "cosine":
            t = 0.5 * (1.0 - math.cos(math.pi * t))
        return self.k * t

    def sample(self, layer_names: Sequence[str], blocks: Sequence[tuple[str, Sequence[str]]] | None,
               epoch: float, generator: torch.Generator) -> BitAssignment:
        """Draw the sub-net for one iteration. `blocks` (from residual_blocks) is needed for granularity
        "block"; layers outside every listed block draw on their own."""
        choices = self.bits.activations
        n = len(layer_names)
        draw = lambda size: torch.randint(len(choices), (size,), generator=generator).tolist()  # noqa: E731
        layer_wise = self.stage == 3 and float(torch.rand((), generator=generator)) < self.layer_wise_probability(epoch)
        if not layer_wise:
            b = choices[draw(1)[0]]
            return BitAssignment(bits=(b,) * n, quantize_weights=self.stage != 1)
        if self.granularity == "layer":
            return BitAssignment(bits=tuple(choices[i] for i in draw(n)))
        if blocks is None:
            raise ValueError("granularity 'block' needs the model's residual blocks; pass residual_blocks(model).")
        block_of = {name: bi for bi, (_, members) in enumerate(blocks) for name in members}
        block_draws = draw(len(blocks))
        loose = [name for name in layer_names if name not in block_of]
        loose_draws = dict(zip(loose, draw(len(loose)))) if loose else {}
        return BitAssignment(bits=tuple(
            choices[block_draws[block_of[name]]] if name in block_of else choices[loose_draws[name]]
            for name in layer_names
        ))

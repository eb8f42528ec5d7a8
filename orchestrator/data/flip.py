"""The training loader's random horizontal flip, done in place.

FFCV's `RandomHorizontalFlip` copies every image of a batch into a second buffer, flipped or not. This one
draws the same coin flips (`rand(batch) < flip_prob`, FFCV's draw) and reverses the rows of only the images
it flips, where they lie: a third of the CPU time (`bench/loader_parts.py`), and no second buffer to
allocate at every epoch.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


class RandomHorizontalFlipInPlace(Operation):
    """Flip each image of an NHWC uint8 batch left-right with probability `flip_prob`, in its own buffer."""

    def __init__(self, flip_prob: float = 0.5):
        super().__init__()
        self.flip_prob = flip_prob

    def generate_code(self):
        each = Compiler.get_iterator()
        flip_prob = self.flip_prob

        def flip(images, *_):
            chosen = np.random.rand(images.shape[0]) < flip_prob
            width = images.shape[2]
            for i in each(images.shape[0]):
                if chosen[i]:
                    for y in range(images.shape[1]):
                        for x in range(width // 2):
                            for c in range(images.shape[3]):
                                left = images[i, y, x, c]
                                images[i, y, x, c] = images[i, y, width - 1 - x, c]
                                images[i, y, width - 1 - x, c] = left
            return images

        flip.is_parallel = True
        return flip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery | None]:
        return replace(previous_state, jit_mode=True), None

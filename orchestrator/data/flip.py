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

from .seeded_draws import FLIP_DRAWS, batch_key, seed_image_draws


class RandomHorizontalFlipInPlace(Operation):
    """Flip each image of an NHWC uint8 batch left-right with probability `flip_prob`, in its own buffer.
    Without a `seed`, the coin flips are FFCV's draw from the thread's stream; with one, each image's coin is
    seeded on its own (`seeded_draws`), so the same seed flips the same images."""

    def __init__(self, flip_prob: float = 0.5, seed: int | None = None):
        super().__init__()
        self.flip_prob = flip_prob
        self.seed = seed

    def generate_code(self):
        each = Compiler.get_iterator()
        flip_prob, seeded, seed = self.flip_prob, self.seed is not None, self.seed or 0

        def flip(images, _destination, batch_indices):
            if seeded:
                chosen = np.empty(images.shape[0], np.bool_)
                key = batch_key(seed, batch_indices)
                for i in range(images.shape[0]):
                    seed_image_draws(key, batch_indices[i], FLIP_DRAWS)
                    chosen[i] = np.random.rand() < flip_prob
            else:
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
        flip.with_indices = True  # FFCV then passes the batch's sample indices
        return flip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery | None]:
        return replace(previous_state, jit_mode=True), None

"""Reproducible augmentation: each training image's random crop and flip come from a seed of its own.

numba keeps one random stream per thread, seeded from the operating system's entropy, and FFCV hands the
images of a batch to whichever of its threads is free; so FFCV's crops and flips differ from run to run
even with the same `data.seed` and one worker. Here every image reseeds its thread's stream before drawing,
with a seed derived from the run's seed, the batch it is in (the batch's sample indices, which FFCV's
seeded permutation changes every epoch) and its own sample index, and one stream per kind of draw. The
same seed then gives the same batches on any number of threads, and each epoch draws afresh.

The mixing function is splitmix64's finaliser: consecutive inputs give unrelated 64-bit outputs, so nearby
sample indices or seeds do not give correlated streams.
"""
from __future__ import annotations

import numba
import numpy as np

CROP_DRAWS = np.uint64(1)
FLIP_DRAWS = np.uint64(2)
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


@numba.njit  # no cache of its own: it is compiled into its callers' cached code
def _mix(value):
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


@numba.njit(cache=True)
def batch_key(seed, batch_indices):
    """One 64-bit key for (run seed, the batch's sample indices in order)."""
    key = _mix(np.uint64(seed) + _GOLDEN_GAMMA)
    for index in batch_indices:
        key = _mix(key ^ (np.uint64(index) + _GOLDEN_GAMMA))
    return key


@numba.njit(cache=True)
def seed_image_draws(key, sample, kind):
    """Reseed the calling thread's stream (np.random inside numba) for one kind of draw of one image."""
    value = _mix(key ^ _mix(np.uint64(sample) * np.uint64(4) + kind))
    np.random.seed(np.uint32(value >> np.uint64(32)))

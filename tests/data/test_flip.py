"""The in-place flip (`orchestrator.data.flip`) flips exactly the images FFCV's copying flip would."""

from __future__ import annotations

import numba
import numpy as np
from ffcv.transforms import RandomHorizontalFlip

from orchestrator.data.flip import RandomHorizontalFlipInPlace


@numba.njit
def _seed(seed):
    np.random.seed(seed)  # numba's own random stream, the one both flips draw from


def test_same_coin_flips_and_same_pixels_as_ffcv_flip():
    """Same seed, same batch: byte-equal output, some images flipped and some not. An odd width has a middle
    column that stays put; a wrong index (width - x, or half the rows) would show."""
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (24, 5, 7, 3), dtype=np.uint8)
    copying = numba.njit(RandomHorizontalFlip(0.5).generate_code())
    in_place = numba.njit(RandomHorizontalFlipInPlace(0.5).generate_code())

    _seed(11)
    expected = copying(batch, np.empty_like(batch)).copy()
    _seed(11)
    mine = batch.copy()
    returned = in_place(mine, None, np.arange(len(batch), dtype=np.uint64))

    assert returned is mine or np.shares_memory(returned, mine)  # no second buffer
    assert np.array_equal(mine, expected)
    flipped = [i for i in range(len(batch)) if np.array_equal(mine[i], batch[i, :, ::-1])
               and not np.array_equal(batch[i], batch[i, :, ::-1])]
    untouched = [i for i in range(len(batch)) if np.array_equal(mine[i], batch[i])]
    assert len(flipped) + len(untouched) == len(batch) and 0 < len(flipped) < len(batch)


def test_probability_bounds():
    batch = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    never, always = (numba.njit(RandomHorizontalFlipInPlace(p).generate_code()) for p in (0.0, 1.0))
    indices = np.arange(2, dtype=np.uint64)
    assert np.array_equal(never(batch.copy(), None, indices), batch)
    assert np.array_equal(always(batch.copy(), None, indices), batch[:, :, ::-1])


def test_a_seeded_flip_depends_on_the_seed_and_the_batch_not_on_the_stream():
    """With a seed, each image's coin comes from (seed, batch, sample): the thread's stream before the call
    does not matter, and another seed or another batch composition flips other images."""
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 256, (64, 3, 6, 3), dtype=np.uint8)
    indices = np.arange(100, 164, dtype=np.uint64)

    def flipped(seed, batch_indices, stream_seed):
        _seed(stream_seed)  # whatever state the thread's stream is in
        out = numba.njit(RandomHorizontalFlipInPlace(0.5, seed=seed).generate_code())(batch.copy(), None, batch_indices)
        return np.array([not np.array_equal(out[i], batch[i]) for i in range(len(batch))])

    first = flipped(7, indices, stream_seed=1)
    assert np.array_equal(flipped(7, indices, stream_seed=2), first)
    assert 16 < first.sum() < 48  # about half of 64
    assert not np.array_equal(flipped(8, indices, stream_seed=1), first)
    assert not np.array_equal(flipped(7, indices[::-1].copy(), stream_seed=1), first)

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
    returned = in_place(mine, None)

    assert returned is mine or np.shares_memory(returned, mine)  # no second buffer
    assert np.array_equal(mine, expected)
    flipped = [i for i in range(len(batch)) if np.array_equal(mine[i], batch[i, :, ::-1])
               and not np.array_equal(batch[i], batch[i, :, ::-1])]
    untouched = [i for i in range(len(batch)) if np.array_equal(mine[i], batch[i])]
    assert len(flipped) + len(untouched) == len(batch) and 0 < len(flipped) < len(batch)


def test_probability_bounds():
    batch = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    never, always = (numba.njit(RandomHorizontalFlipInPlace(p).generate_code()) for p in (0.0, 1.0))
    assert np.array_equal(never(batch.copy(), None), batch)
    assert np.array_equal(always(batch.copy(), None), batch[:, :, ::-1])

"""Sub-net search (paper section 4.2): exact top-k without enumeration, budgets respected."""
import numpy as np
import pytest

from bitmixer_core.subnet_search import (
    brute_force_top_k,
    sample_assignments_with_total,
    top_k_by_average_bits,
    top_k_by_bitops,
    total_bits_for_average,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("average_bits", [2.5, 3.0, 3.4])
def test_average_bits_search_equals_brute_force(seed, average_bits):
    """The DP must return exactly the brute-force top-k (same assignments, same order) of total cost C."""
    rng = np.random.default_rng(seed)
    eig = rng.gamma(1.0, 1.0, size=8).tolist()
    total = total_bits_for_average(8, average_bits)
    got = top_k_by_average_bits(eig, (2, 3, 4), average_bits, k=7)
    want = brute_force_top_k(eig, (2, 3, 4), 7, total_bits=total)
    assert [a.bits for a in got] == [a.bits for a in want]
    assert all(sum(a.bits) == total for a in got)


def test_ties_are_broken_like_sorted_brute_force():
    """Equal eigenvalues make many ties; the order must still equal sorting by (-score, bits)."""
    eig = [1.0, 1.0, 2.0, 2.0, 1.0, 0.5]
    got = top_k_by_average_bits(eig, (2, 3, 4), 3.0, k=10)
    want = brute_force_top_k(eig, (2, 3, 4), 10, total_bits=18)
    assert [a.bits for a in got] == [a.bits for a in want]


def test_best_assignment_puts_bits_on_high_eigenvalue_layers():
    """Highest score is best: the sharpest layer gets the most bits, the flattest the fewest."""
    best = top_k_by_average_bits([0.1, 5.0, 1.0], (2, 3, 4), 3.0, k=1)[0]
    assert best.bits == (2, 4, 3)


@pytest.mark.parametrize("seed", [0, 3])
def test_bitops_search_equals_brute_force_and_meets_budget(seed):
    """BitOPs search returns the brute-force top-k among assignments with BitOPs <= budget."""
    rng = np.random.default_rng(seed)
    eig = rng.gamma(1.0, 1.0, size=7).tolist()
    macs = rng.integers(1_000, 50_000, size=7).tolist()
    wbits = {2: 1, 3: 3, 4: 4}
    budget = int(sum(macs) * 9)  # as much as all layers at A3/W3
    got = top_k_by_bitops(eig, macs, wbits, budget, k=9)
    want = brute_force_top_k(eig, (2, 3, 4), 9, macs=macs, weight_bits_of=wbits, bitops_budget=budget)
    assert [a.bits for a in got] == [a.bits for a in want]
    for a in got:
        assert sum(m * wbits[b] * b for m, b in zip(macs, a.bits)) <= budget


def test_impossible_budgets_are_refused_with_a_reason():
    """An average outside the bit range, or a BitOPs budget below the cheapest net, is a clear error."""
    with pytest.raises(ValueError, match="choose an average between 2 and 4"):
        top_k_by_average_bits([1.0, 2.0], (2, 3, 4), 5.0, k=1)
    with pytest.raises(ValueError, match="raise the budget"):
        top_k_by_bitops([1.0], [10], {2: 2, 4: 4}, 39, k=1)


def test_random_assignments_hit_the_total_and_cover_the_population():
    """Random baselines have exactly the same total bits and are drawn uniformly (all 6 seen, evenly)."""
    rng = np.random.default_rng(0)
    samples = sample_assignments_with_total(3, (2, 3, 4), 3.0 + 1 / 3, 600, rng)  # total 10: 6 assignments
    assert all(sum(s) == 10 for s in samples)
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 6  # (2,4,4) x3 perms + (3,3,4) x3 perms
    assert min(counts.values()) > 60  # uniform: ~100 each


def test_deep_network_search_is_fast_enough_to_not_enumerate():
    """50 layers x 3 bits (7e23 assignments) must still be searched exactly by the DP."""
    eig = np.linspace(0.1, 5.0, 50).tolist()
    got = top_k_by_average_bits(eig, (2, 3, 4), 3.0, k=5)
    assert len(got) == 5 and all(sum(a.bits) == 150 for a in got)
    assert got[0].bits == tuple([2] * 25 + [4] * 25)


def test_layer_macs_count_convolution_multiply_accumulates():
    """MACs of a conv = output elements per image x (in_channels/groups x kernel area)."""
    import torch

    from bitmixer_core import build_model, quantized_layers
    from bitmixer_core.subnet_search import layer_macs

    model = build_model("resnet_tiny", num_classes=10, stem="small")
    macs = layer_macs(model, torch.zeros(2, 3, 8, 8))
    assert list(macs) == [n for n, _ in quantized_layers(model)]
    # layer1.0.conv1: 8 -> 8 channels, 3x3, on the 8x8 map of the small stem: 8*8*8 outputs x 8*9
    assert macs["layer1.0.conv1"] == 8 * 8 * 8 * 8 * 9

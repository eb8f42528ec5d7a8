"""Stage policies (section 3.3)."""

import pytest
import torch

from bitmixer_core import StagePolicy

LAYERS = [f"l{i}" for i in range(20)]
BLOCKS = [(f"b{i}", LAYERS[2 * i: 2 * i + 2]) for i in range(10)]


def is_layer_wise(assignment):
    return len(set(assignment.bits)) > 1  # 20 independent layers drawing alike: probability 3 * 3**-20


def test_stages_one_and_two_draw_one_bit_width_for_all_layers():
    """Stage I: one b for all layers, weights real; Stage II: one b for all layers, weights quantized;
    every b is drawn about equally often."""
    g = torch.Generator().manual_seed(0)
    for policy, weights in ((StagePolicy.stage_one((2, 3, 4)), False), (StagePolicy.stage_two((2, 3, 4)), True)):
        draws = [policy.sample(LAYERS, BLOCKS, epoch=5.0, generator=g) for _ in range(600)]
        assert all(len(set(a.bits)) == 1 and a.quantize_weights is weights for a in draws)
        counts = [sum(a.bits[0] == b for a in draws) for b in (2, 3, 4)]
        assert min(counts) > 150


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_stage_three_layer_wise_fraction_follows_one_minus_sigma(shape):
    """The share of layer-wise draws at epoch t is 1 - sigma(t): 0 -> k over ramp_epochs, then k."""
    policy = StagePolicy.stage_three((2, 3, 4), k=0.75, ramp_epochs=10, ramp_shape=shape)
    g = torch.Generator().manual_seed(0)
    n = 3000
    for epoch in (0.0, 2.5, 5.0, 10.0, 30.0):
        expected = policy.layer_wise_probability(epoch)
        share = sum(is_layer_wise(policy.sample(LAYERS, BLOCKS, epoch, g)) for _ in range(n)) / n
        assert share == pytest.approx(expected, abs=0.035), (epoch, share, expected)
    assert policy.layer_wise_probability(0.0) == 0.0 and policy.layer_wise_probability(30.0) == 0.75
    linear = StagePolicy.stage_three((2, 3, 4), k=0.75, ramp_epochs=10)
    assert linear.layer_wise_probability(5.0) == pytest.approx(0.375)


def test_block_granularity_shares_one_draw_per_block():
    """granularity="block": both layers of a block always agree, blocks differ from each other."""
    policy = StagePolicy.stage_three((2, 3, 4), k=1.0, ramp_epochs=0, granularity="block")
    g = torch.Generator().manual_seed(0)
    a = policy.sample(LAYERS, BLOCKS, 0.0, g)
    assert all(a.bits[2 * i] == a.bits[2 * i + 1] for i in range(10))
    assert len(set(a.bits)) > 1


def test_same_seed_generators_give_identical_draws():
    """Two ranks whose generators share a seed draw the same sub-nets; another seed draws others."""
    policy = StagePolicy.stage_three((2, 3, 4), k=0.75, ramp_epochs=4)
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [policy.sample(LAYERS, BLOCKS, e / 10, g) for e in range(60)]
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_bad_policy_settings_are_rejected():
    """k outside [0, 1], an unknown ramp shape or granularity fail with the field named."""
    with pytest.raises(ValueError, match="k "):
        StagePolicy.stage_three((2, 3, 4), k=1.5)
    with pytest.raises(ValueError, match="ramp_shape"):
        StagePolicy.stage_three((2, 3, 4), ramp_shape="exp")
    with pytest.raises(ValueError, match="granularity"):
        StagePolicy.stage_three((2, 3, 4), granularity="stage")

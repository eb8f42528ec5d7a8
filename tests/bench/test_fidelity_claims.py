"""bench/fidelity.py's claim checks (a)-(f) on hand-made figures: each claim passes on figures that meet
its threshold and fails on figures just past it; claims are judged on the means over seeds."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "fidelity.py"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("bench_fidelity", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def good_run() -> dict:
    """One seed whose figures meet every claim."""
    subnets = {"2.5": {"higher_mean": 80.0, "higher_best": 82.0, "lower_mean": 70.0, "lower_best": 72.0,
                       "random_mean": 75.0},
               "3": {"higher_mean": 85.0, "higher_best": 87.0, "lower_mean": 78.0, "lower_best": 80.0,
                     "random_mean": 81.0},
               "3.5": {"higher_mean": 88.0, "higher_best": 90.0, "lower_mean": 84.0, "lower_best": 86.0,
                       "random_mean": 86.0}}
    return {"two": {"2": 90.0, "3": 94.0, "4": 95.0, "rand": 50.0},
            "three": {"2": 89.0, "3": 93.5, "4": 94.5, "rand": 92.0},
            "independent": {"2": 88.5},
            "no_transitional_bn": {"2": 60.0, "3": 70.0, "4": 72.0, "rand": 40.0},
            "bits_4321": {"1": 60.0, "2": 88.0, "3": 92.0, "4": 93.0, "rand": 70.0},
            "subnets": subnets}


def judge(fidelity, runs):
    claims = fidelity.check_claims(runs, bits=[2, 3, 4], num_classes=10, independent_bits=2)
    return {c.key: c for c in claims}


def test_figures_that_meet_every_threshold_pass_every_claim(fidelity):
    claims = judge(fidelity, [good_run(), good_run()])
    assert [k for k, c in claims.items() if not c.passed] == []
    assert all(c.seeds_passed == 2 and c.seeds == 2 for c in claims.values())


@pytest.mark.parametrize("key, path, value", [
    ("a", ("three", "2"), 87.9),           # 2.1 points below Stage II's 90.0
    ("b", ("three", "rand"), 95.0),        # above the 4-bit figure 94.5
    ("b", ("two", "rand"), 72.1),          # Stage III's Rand. only 19.9 above Stage II's
    ("c", ("no_transitional_bn", "rand"), 72.1),  # drop of 19.9
    ("d", ("bits_4321", "1"), 29.9),       # below 3 x chance (10 classes: 30.0)
    ("e", ("two", "2"), 85.4),             # 3.1 below the Independent network's 88.5
    ("f", ("subnets", "3", "higher_mean"), 80.9),   # the top-k mean below the random mean 81.0
    ("f", ("subnets", "3.5", "higher_best"), 86.9),  # the best sub-net falls from 3 to 3.5 bits
])
def test_figures_just_past_a_threshold_fail_that_claim_only(fidelity, key, path, value):
    run = good_run()
    target = run
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    claims = judge(fidelity, [run])
    assert not claims[key].passed
    assert [k for k, c in claims.items() if not c.passed] == [key]
    assert claims[key].seeds_passed == 0


def test_a_stage_three_below_the_independent_network_fails_e(fidelity):
    run = good_run()
    run["two"]["2"], run["three"]["2"] = 86.0, 85.4  # III within 2 points of II, 3.1 below Independent
    claims = judge(fidelity, [run])
    assert [k for k, c in claims.items() if not c.passed] == ["e"]


def test_stage_three_above_stage_two_is_within_the_claim(fidelity):
    run = good_run()
    run["three"]["4"] = 99.0  # 4 points better than Stage II: (a) asks only that III is not 2 points worse
    assert judge(fidelity, [run])["a"].passed


def test_claims_are_judged_on_the_means_over_seeds(fidelity):
    bad = good_run()
    bad["no_transitional_bn"]["rand"] = 80.0  # drop of 12 on this seed
    good = good_run()
    good["no_transitional_bn"]["rand"] = 30.0  # drop of 62; the third seed drops 52: mean 42, sample std 26.5
    claim = judge(fidelity, [good, bad, good_run()])["c"]
    assert claim.passed and claim.seeds_passed == 2 and claim.seeds == 3
    assert "drop 42.0 ± 26.5" in claim.ours


def test_the_reverse_ranking_is_named_when_only_it_beats_random(fidelity):
    run = good_run()
    for figures in run["subnets"].values():
        figures["higher_mean"], figures["lower_mean"] = figures["lower_mean"], figures["higher_mean"]
        figures["higher_best"], figures["lower_best"] = figures["lower_best"], figures["higher_best"]
    claim = judge(fidelity, [run])["f"]
    assert not claim.passed
    assert "the reverse" in claim.note and "lower: holds" in claim.note


def test_mean_and_sample_std(fidelity):
    assert fidelity.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert fidelity.mean_std([5.0]) == (5.0, 0.0)
    assert fidelity.fmt([1.0, 2.0, 3.0]) == "2.0 ± 1.0"
    with pytest.raises(ValueError, match="no figures"):
        fidelity.mean_std([])


def test_no_seed_is_refused_in_one_sentence(fidelity):
    with pytest.raises(ValueError, match="no finished seed"):
        fidelity.check_claims([], bits=[2, 3, 4], num_classes=10, independent_bits=2)


"""The Stage III sweep's pure logic: the objective a trial is ranked by, and the trial's stage config."""
from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.engine.config import config_hash
from orchestrator.pipeline.config import load_pipeline_config
from orchestrator.pipeline.plan import build_plan
from orchestrator.pipeline.sweep import objective, trial_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
METRICS = {"holdout/top1_2bit": 60.0, "holdout/top1_3bit": 70.0, "holdout/top1_4bit": 80.0,
           "holdout/rand_top1_mean": 50.0,
           # The validation figures the tables report: they must never rank a trial.
           "val/top1_2bit": 99.0, "val/top1_3bit": 99.0, "val/top1_4bit": 99.0, "val/rand_top1_mean": 99.0}


def test_objectives():
    """mean_bits_and_rand is the mean of the per-bit row and Rand. (the paper's whole Table 7 row);
    'rand' and 'lowest_bit' pick one cell; an evaluation that is missing a cell scores None, not 0."""
    assert objective(METRICS, [2, 3, 4], "mean_bits_and_rand") == pytest.approx(65.0)
    assert objective(METRICS, [2, 3, 4], "rand") == 50.0
    assert objective(METRICS, [2, 3, 4], "lowest_bit") == 60.0
    assert objective({"holdout/top1_2bit": 1.0}, [2, 3, 4], "mean_bits_and_rand") is None


def test_the_sweep_objective_reads_a_held_out_slice_of_the_training_set():
    """Every trial trains without the held-out slice and is ranked on it, never on the validation set."""
    cfg = load_pipeline_config(CONFIGS / "embedded.yaml")
    base = build_plan(cfg, data_path="/d", tracking_uri="sqlite:////tmp/x.db").nodes["resnet_tiny/main/three"].config
    assert base.data.holdout_fraction == 0  # the main chain trains on the whole training set
    trial = trial_config(base, 0.8, 3, "cosine", "sweep-run", holdout_fraction=cfg.sweep.holdout_fraction)
    assert trial.data.holdout_fraction == cfg.sweep.holdout_fraction > 0
    assert objective({k: v for k, v in METRICS.items() if k.startswith("val/")}, [2, 3, 4], "rand") is None


def test_held_out_slice_is_disjoint_from_training_and_class_balanced():
    """holdout_split: every k-th image held out; the two sets partition the training set."""
    import numpy as np

    from orchestrator.data.loaders import holdout_split
    train, held = holdout_split(1000, 0.1)
    assert len(held) == 100 and len(train) == 900 and not set(train.tolist()) & set(held.tolist())
    assert train.dtype == np.uint64 and held.dtype == np.uint64  # FFCV's index type
    labels = np.repeat(np.arange(10), 100)  # a class-ordered file
    assert np.bincount(labels[held.astype(int)], minlength=10).tolist() == [10] * 10
    assert len(holdout_split(50, 0.0)[1]) == 0


def test_trial_config_changes_only_the_swept_values():
    """A trial is its base Stage III config with k / ramp_epochs / ramp_shape replaced, a name of its own and
    the sweep's run as parent; every other setting, and so the model it starts from, stays the same."""
    cfg = load_pipeline_config(CONFIGS / "embedded.yaml")
    base = build_plan(cfg, data_path="/d", tracking_uri="sqlite:////tmp/x.db").nodes["resnet_tiny/main/three"].config
    base = base.model_copy(update={"init_from": "runs:/abc/model.pt"})
    trial = trial_config(base, 0.8, 3, "cosine", "sweep-run")
    assert (trial.policy.k, trial.policy.ramp_epochs, trial.policy.ramp_shape) == (0.8, 3, "cosine")
    assert trial.name == "resnet_tiny-main-three-k0.8-ramp3-cosine" and trial.tracking.parent_run_id == "sweep-run"
    assert trial.init_from == base.init_from and trial.optim == base.optim and trial.model == base.model
    other = trial_config(base, 0.6667, 3, "cosine", "sweep-run")
    assert config_hash(trial) != config_hash(other)  # each trial is found done by its own hash
    assert config_hash(trial) == config_hash(trial_config(base, 0.8, 3, "cosine", "another-sweep-run"))


def test_the_embedded_presets_sweep_trials_run_at_the_same_time_on_two_cores(monkeypatch):
    """The default run's critical path is Stage I -> II -> the sweep: on the 2-core machine both trials of a
    sweep must fit at once (trial process + its 2 workers), not one after the other, and four stages'
    worker groups must fit side by side, so that one stage's start-up fills another's idle time."""
    import ray

    from orchestrator.pipeline.sweep import _trials_that_fit
    cfg = load_pipeline_config(CONFIGS / "embedded.yaml")
    base = build_plan(cfg, data_path="/d", tracking_uri="sqlite:////tmp/x.db").nodes["resnet_tiny/main/three"].config
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert _trials_that_fit(base, cfg.scaling.trial_cpus) >= cfg.sweep.num_trials == 2
    assert 2.0 // (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) >= 4

"""What makes a stage train again and what does not: the config hash follows the data's content and what
changes results, not the failure budget or the number of loader processes; sweep repeats are trials of
their own."""
from __future__ import annotations

import shutil

from .conftest import ROOT


def _stage(data, **changes):
    from orchestrator.engine import StageConfig
    raw = dict(name="s", model=dict(name="resnet_tiny", num_classes=10, stem="small"),
               data=dict(path=str(data), batch_size=8, num_workers=1), optim=dict(epochs=2, warmup_epochs=0),
               policy=dict(stage="one"), max_failures=1)
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            raw[section] = {**raw[section], field: value}
        else:
            raw[section] = value
    return StageConfig.model_validate(raw)


def test_hash_ignores_failure_budget_and_loader_processes(digits):
    """max_failures and data.num_workers do not change what is trained: a change of either keeps the hash
    (the finished stage is found), a change of the learning rate does not."""
    from orchestrator.engine import config_hash
    base = config_hash(_stage(digits))
    assert config_hash(_stage(digits, max_failures=5)) == base
    assert config_hash(_stage(digits, **{"data.num_workers": 6})) == base
    assert config_hash(_stage(digits, **{"optim.lr_peak": 0.01})) != base


def test_hash_follows_the_data_under_the_same_path(digits, tmp_path):
    """New data written under the same path (another classes.json, another .beton) is a new stage: the hash
    covers the data folder's manifest, not only its path."""
    from orchestrator.engine import config_hash
    folder = tmp_path / "data"
    shutil.copytree(digits, folder)
    before = config_hash(_stage(folder))
    shutil.copy(folder / "val.beton", folder / "train.beton")  # the same path, other data
    assert config_hash(_stage(folder)) != before


def test_sweep_repeats_are_distinct_trials():
    """Repeat r of a grid point has its own seed, name and config hash (so its own MLflow run and Ray run
    name); repeat 0 is the trial as before."""
    from orchestrator.engine import config_hash
    from orchestrator.pipeline.config import load_pipeline_config
    from orchestrator.pipeline.plan import build_plan
    from orchestrator.pipeline.sweep import trial_config
    cfg = load_pipeline_config(ROOT / "pipelines" / "configs" / "embedded.yaml")
    base = build_plan(cfg, data_path="/d", tracking_uri="sqlite:////tmp/x.db").nodes["resnet_tiny/main/three"].config
    first, second = (trial_config(base, 0.8, 1, "linear", "sweep", repeat=r) for r in (0, 1))
    assert first == trial_config(base, 0.8, 1, "linear", "sweep")
    assert second.name == first.name + "-r1" and second.seed == first.seed + 1
    assert config_hash(first) != config_hash(second)

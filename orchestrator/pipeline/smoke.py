"""A preset's whole DAG at toy size, to prove it before a cluster pays for it (`full_paper.py --smoke`).

The same architectures, stages, teachers, bit sets, BN modes, quantizers, sweep, baselines and ablations as
the preset, on the embedded digits at 32 px with the small-input stem, one epoch of a few steps a stage,
on local CPU workers, tracked in a local store under runs/smoke/<name>. What it shows is that every stage
the preset produces builds, loads what it starts from, trains, evaluates and hands on its model; its
figures mean nothing.
"""
from __future__ import annotations

from orchestrator.pipeline.config import PipelineConfig, parse_pipeline_config

STEPS_PER_EPOCH = 2
BATCH_SIZE = 8  # global: 4 images on each of the 2 workers


def smoke_config(cfg: PipelineConfig) -> PipelineConfig:
    """`cfg` shrunk to toy size; everything that decides which stages run, and how, is kept."""
    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw["name"] = f"{cfg.name}-smoke"
    raw["work_dir"] = f"runs/smoke/{cfg.name}"
    raw.pop("seeds", None)  # one seed: the point is the DAG, not the error bars
    raw["data"] = {"embedded": "digits", "num_classes": 10, "train_resolution": 32, "val_resolution": 32,
                   "val_crop_ratio": 1.0, "batch_size": BATCH_SIZE, "train_crop_scale": [0.35, 1.0],
                   "num_workers": 1}
    small = {"epochs": 1, "warmup_epochs": 0, "eval_every": 1, "max_steps_per_epoch": STEPS_PER_EPOCH}
    for arch in raw["architectures"]:
        arch["stem"] = "small"
        for name, stage in arch["stages"].items():
            stage.update(small)
            if name == "three":
                stage["ramp_epochs"] = 0
    if raw["sweep"]["enabled"]:
        raw["sweep"].update(k=raw["sweep"]["k"][:1], ramp_epochs=[0], ramp_shape=raw["sweep"]["ramp_shape"][:1],
                            num_samples=1, asha=False, max_concurrent_trials=1)
    raw["scaling"] = {"num_workers": 2, "use_gpu": False, "cpus_per_worker": 0.5, "gpus_per_worker": 0.0,
                      "trial_cpus": 0.25, "zero_stage": raw["scaling"].get("zero_stage", 1)}
    tracking = raw["tracking"]
    for key in ("tracking_uri", "storage_path"):
        tracking.pop(key, None)  # the local store of the work dir
    tracking.update(experiment=f"{tracking.get('experiment', 'bitmixer')}-smoke", analysis_eigenvalues=False)
    return parse_pipeline_config(raw, f"{cfg.name} (smoke)")

"""What one node of the pipeline ended as, and how a finished stage is found again in MLflow.

A re-submitted pipeline asks MLflow, for each stage, for a FINISHED run tagged with the stage's config
hash; if there is one the stage is `skipped` and its model is that run's model.pt. Models are handed
between stages as `runs:/<run_id>/model.pt` URIs, so a stage on any node of a cluster can read its
predecessor's model, and the URI (part of the next stage's config hash) is the same on every re-submission.
"""
from __future__ import annotations

from dataclasses import dataclass, field

FINISHED, SKIPPED, FAILED, BLOCKED = "finished", "skipped", "failed", "blocked"
MODEL_ARTIFACT = "model.pt"


@dataclass
class StageOutcome:
    key: str                        # plan key "<arch>/<variant>/<stage>"
    status: str                     # finished / skipped (found done in MLflow) / failed / blocked (upstream failed)
    run_id: str | None = None
    model_uri: str | None = None
    metrics: dict = field(default_factory=dict)
    config_hash: str | None = None
    error: str | None = None        # one line: why it failed, or which upstream stage blocked it
    detail: str = ""                # e.g. the sweep's trials, "resumed at epoch 3"
    traceback: str = ""             # a failed stage's traceback, for the driver to show

    @property
    def ok(self) -> bool:
        return self.status in (FINISHED, SKIPPED)


def model_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def per_bit_top1(metrics: dict, bits: list[int]) -> dict[str, float]:
    """The engine's metrics (val/top1_4bit, val/rand_top1_mean, ...) as the tables' bit keys ("4", "rand")."""
    from orchestrator.engine.evaluation import RAND_TOP1, top1_key
    out = {str(b): float(metrics[top1_key(b)]) for b in bits if top1_key(b) in metrics}
    if RAND_TOP1 in metrics:
        out["rand"] = float(metrics[RAND_TOP1])
    return out


def headline_metrics(per_bit: dict[tuple[str, str, str], dict[str, float]]) -> dict[str, float]:
    """The pipeline run's comparison figures, named architecture / stage / bit-width: from the tables'
    (architecture, variant, stage) -> bit key -> top-1, e.g. `resnet18/stage3/top1_2bit`,
    `resnet18/stage3/rand`, `resnet18/indep/top1_4bit` (an Independent network at its own bit-width only),
    `resnet18/no_transitional_bn/stage3/rand` for an ablation."""
    out: dict[str, float] = {}
    for (arch, variant, stage), figures in per_bit.items():
        if variant.startswith("independent_"):
            bits = variant.removeprefix("independent_")
            if bits in figures:
                out[f"{arch}/indep/top1_{bits}bit"] = float(figures[bits])
            continue
        from orchestrator.pipeline.plan import stage_short
        stage_name = stage_short(stage)
        prefix = f"{arch}/{stage_name}" if variant == "main" else f"{arch}/{variant}/{stage_name}"
        for key, value in figures.items():
            name = f"{prefix}/rand" if key == "rand" else f"{prefix}/top1_{key}bit"
            out[name] = float(value)
            if hasattr(value, "std"):  # a MeanStd over seeds
                out[f"{name}_std"] = value.std
    return out


def finished_outcome(key: str, tracking_uri: str, experiment: str, digest: str) -> StageOutcome | None:
    """The outcome of an earlier FINISHED run of this exact stage config, or None."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.stage_run import find_finished_run

    run_id = find_finished_run(tracking_uri, experiment, digest)
    if run_id is None:
        return None
    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    metrics = dict(run.data.metrics)  # each metric's latest value: the stage's last evaluation
    return StageOutcome(key=key, status=SKIPPED, run_id=run_id, model_uri=model_uri(run_id), metrics=metrics,
                        config_hash=digest, detail=f"found FINISHED in MLflow (run {run_id[:8]})")

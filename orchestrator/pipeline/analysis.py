"""The paper's analysis figures (Fig. 3, 5, 6, 7) of each architecture's final Stage III model.

After an architecture's main-chain Stage III has finished (or was found finished), its model.pt is loaded
on CPU, a couple of validation batches are read, and the PNGs are logged under ``analysis/`` of that stage's
MLflow run. Plotting is a by-product: any error becomes one warning line, never a failed pipeline.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

ARTIFACT_DIR = "analysis"
MAX_BATCHES = 2          # enough for the variance plots and a short power iteration; keeps it cheap
MAX_IMAGES = 64          # per batch: the Hessian power iteration costs one double-backward per image batch


def val_batches(data_cfg, limit: int = MAX_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `limit` validation batches on CPU, as one process (no process group)."""
    from orchestrator.data.loaders import build_val_loader

    loader = build_val_loader(data_cfg, rank=0, world_size=1, device=torch.device("cpu"))
    return [(x[:MAX_IMAGES].float(), y[:MAX_IMAGES]) for x, y in itertools.islice(iter(loader), limit)]


def log_stage_analysis(model_uri: str, run_id: str, batches: Sequence, *, tracking_uri: str | None,
                       eigenvalues: bool = True) -> list[str]:
    """Load a stage's model.pt, draw Fig. 3/5/6/7 and log them as PNGs in run `run_id`; returns their paths.

    With `eigenvalues=False` the Hessian power iteration is skipped (Fig. 5 is then left out).
    """
    from mlflow.tracking import MlflowClient

    from orchestrator.deploy import plots
    from orchestrator.deploy.mlflow_log import log_figures
    from orchestrator.engine.checkpoint import load_model

    model = load_model(model_uri, tracking_uri)
    model.eval()
    batches = list(batches)[:MAX_BATCHES]
    target = (MlflowClient(tracking_uri=tracking_uri), run_id)
    if eigenvalues:
        return plots.log_analysis_plots(model, batches, target, artifact_dir=ARTIFACT_DIR)
    if not batches:
        raise ValueError("batches is empty: pass at least one (images, labels) batch for the analysis plots.")
    figures = {"fig3_tbn_variance.png": plots.tbn_variance_figure(model, batches[0][0]),
               "fig6_weight_distributions.png": plots.weight_distribution_figure(model),
               "fig7_step_sizes.png": plots.step_size_figure(model)}
    return log_figures(target, figures, ARTIFACT_DIR)


def analyse_final_stage(arch: str, outcome, data_cfg, *, tracking_uri: str | None,
                        eigenvalues: bool = True) -> list[str]:
    """Log the analysis figures of one architecture's final model; on any error print a warning, return []."""
    try:
        if not outcome.ok or not outcome.run_id or not outcome.model_uri:
            return []
        paths = log_stage_analysis(outcome.model_uri, outcome.run_id, val_batches(data_cfg),
                                   tracking_uri=tracking_uri, eigenvalues=eigenvalues)
        print(f"[pipeline] {arch}: logged {len(paths)} analysis figures to run {outcome.run_id[:8]}", flush=True)
        return paths
    except Exception as err:  # figures are a by-product; the trained model and its metrics stand
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"[pipeline] WARNING: analysis plots of {arch} not logged: {type(err).__name__}: {first}", flush=True)
        return []

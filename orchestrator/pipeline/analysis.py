"""The paper's analysis figures (Fig. 3, 4, 5, 6, 7) of each architecture's final Stage III model.

After an architecture's main-chain Stage III has finished (or was found finished), its model.pt is loaded
on CPU, a couple of validation batches are read, and the PNGs are logged under ``analysis/`` of that stage's
MLflow run, each titled with its figure number, the architecture, the stage and the run. Fig. 4 (top-1
against average bits and against BitOPs) and Fig. 5 (the layers' Hessian eigenvalues the search ranks by)
come from the section 4.2 sub-net search: the one Table 6 runs on the final model (`subnet_table`), or,
with eigenvalues on and no Table 6, one on the same batches here. Plotting is a by-product: any error
becomes one warning line, never a failed pipeline.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

ARTIFACT_DIR = "analysis"
MAX_BATCHES = 2          # enough for the variance plots and a short power iteration; keeps it cheap
MAX_IMAGES = 64          # per batch: the Hessian power iteration costs one double-backward per image batch


def caption(run) -> str:
    """What a figure is of: "<architecture>, <stage>, run <name> (<id>)", from the run's tags and name."""
    from orchestrator.tracking.stage_run import TAG_ARCHITECTURE, TAG_STAGE
    tags = run.data.tags
    from bitmixer_core import STAGES
    stage = tags.get(TAG_STAGE, "")
    parts = [tags.get(TAG_ARCHITECTURE), STAGES[stage].title if stage in STAGES else stage,
             f"run {run.info.run_name} ({run.info.run_id[:8]})" if run.info.run_name else f"run {run.info.run_id[:8]}"]
    return ", ".join(p for p in parts if p)


def search_budgets(bit_choices: Sequence[int]) -> list[float]:
    """Average bit-widths strictly between the lowest and highest (2.5, 3.0, 3.5 for {2, 3, 4})."""
    low, high = min(bit_choices), max(bit_choices)
    return [low + (high - low) * i / 4 for i in (1, 2, 3)]


def val_batches(data_cfg, limit: int = MAX_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `limit` validation batches on CPU, as one process (no process group)."""
    from orchestrator.data.loaders import build_val_loader

    loader = build_val_loader(data_cfg, rank=0, world_size=1, device=torch.device("cpu"))
    # Copies: the loader hands out reused buffers, which a later batch would overwrite.
    return [(x[:MAX_IMAGES].float().clone(), y[:MAX_IMAGES].clone()) for x, y in itertools.islice(iter(loader), limit)]


def log_stage_analysis(model_uri: str, run_id: str, batches: Sequence, *, tracking_uri: str | None,
                       eigenvalues: bool = True) -> list[str]:
    """Load a stage's model.pt, draw Fig. 3/5/6/7 and log them as PNGs in run `run_id`; returns their paths.

    With `eigenvalues=False` the Hessian power iteration is skipped (Fig. 5 is then left out).
    """
    from mlflow.tracking import MlflowClient

    import bitmixer_core as core
    from orchestrator.deploy import plots
    from orchestrator.deploy.config import SearchConfig
    from orchestrator.deploy.mlflow_log import log_figures
    from orchestrator.deploy.subnets import find_subnets
    from orchestrator.engine.checkpoint import load_model

    model = load_model(model_uri, tracking_uri)
    model.eval()
    batches = list(batches)[:MAX_BATCHES]
    if not batches:
        raise ValueError("batches is empty: pass at least one (images, labels) batch for the analysis plots.")
    client = MlflowClient(tracking_uri=tracking_uri)
    title = caption(client.get_run(run_id))
    figures = {"fig3_tbn_variance.png": plots.tbn_variance_figure(model, batches[0][0], title),
               "fig6_weight_distributions.png": plots.weight_distribution_figure(model, caption=title),
               "fig7_step_sizes.png": plots.step_size_figure(model, title)}
    if eigenvalues:
        bit_choices = core.quantized_layers(model)[0][1].bit_widths.activations
        search = SearchConfig(average_bits=search_budgets(bit_choices), top_k=3, random_per_budget=3,
                              sensitivity_batches=len(batches))
        figures.update(search_figures(find_subnets(model, batches, batches, search), title))
    return log_figures((client, run_id), dict(sorted(figures.items())), ARTIFACT_DIR)


def search_figures(report, title: str) -> dict:
    """Fig. 4 (top-1 of the evaluated sub-nets against average bits and against BitOPs) and Fig. 5 (the
    layers' Hessian eigenvalues they were ranked by) of one sub-net search, by their artifact names."""
    from orchestrator.deploy import plots

    figures = {f"fig4_{name.removeprefix('subnets_')}": figure
               for name, figure in plots.subnet_figures(report, title).items()}
    figures["fig5_layer_eigenvalues.png"] = plots.eigenvalue_figure(report.layer_names, report.eigenvalues, title)
    return figures


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

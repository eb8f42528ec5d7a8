"""Table 6 of the paper from each architecture's final model: sub-nets at fractional average bit-widths.

Section 4.2 extracts sub-nets for an average bit-width budget from the trained meta-network, with no
training: each layer's top Hessian eigenvalue (power iteration at the highest bit-width) ranks the
assignments of that total cost, and the best-ranked ones are evaluated. Table 6 puts the result at average
bits 3.5 / 3 / 2.5 beside the fixed 4 and 2 bits. Here, per budget, the top-k assignments by that score
and as many random assignments of exactly the same total are evaluated on validation images; the table
shows the best of the top-k, and the mean of the random ones as the reference a search must beat.

Like the analysis plots, it is a by-product of the final model: an error is one warning line.
"""
from __future__ import annotations

import torch

from orchestrator.pipeline.analysis import search_budgets

METRIC_PREFIX = "subnets/"
MAX_EVAL_IMAGES = 2048   # validation images each candidate is evaluated on (all of a small set)
SENSITIVITY_BATCHES = 2  # batches of the Hessian power iteration
TOP_K = RANDOM_PER_BUDGET = 3


def budget_key(average_bits: float) -> str:
    """The metric-name form of a budget: 2.5 -> "avg2.5" (MLflow metric names hold no "=")."""
    return f"avg{average_bits:g}"


def subnet_metrics(summary: dict[str, float]) -> dict[str, float]:
    """find_subnets' summary ("avg_bits=2.5/top_best_top1", ...) as metric names ("subnets/avg2.5/top_best_top1")."""
    out = {}
    for key, value in summary.items():
        budget, _, figure = key.partition("/")
        if budget.startswith("avg_bits="):
            out[f"{METRIC_PREFIX}{budget_key(float(budget.removeprefix('avg_bits=')))}/{figure}"] = float(value)
    return out


def search_final_model(model_uri: str, run_id: str, data_cfg, *, tracking_uri: str | None,
                       max_images: int = MAX_EVAL_IMAGES) -> dict[str, float]:
    """Run the section 4.2 search on a stage's model.pt, log its figures as metrics of `run_id`, the
    evaluated sub-nets as `analysis/subnets_table6.json` and its plots (Fig. 4 and 5) under `analysis/`;
    returns the metrics."""
    from mlflow.tracking import MlflowClient

    import bitmixer_core as core
    from orchestrator.data.loaders import build_val_loader
    from orchestrator.deploy.config import SearchConfig
    from orchestrator.deploy.mlflow_log import log_figures
    from orchestrator.deploy.subnets import find_subnets, materialize
    from orchestrator.engine.checkpoint import load_model
    from orchestrator.pipeline.analysis import ARTIFACT_DIR, caption, search_figures

    model = load_model(model_uri, tracking_uri)
    model.eval()
    loader = build_val_loader(data_cfg, rank=0, world_size=1, device=torch.device("cpu"))
    batches = materialize(_first_images(loader, max_images))
    bit_choices = core.quantized_layers(model)[0][1].bit_widths.activations
    search = SearchConfig(average_bits=search_budgets(bit_choices), top_k=TOP_K, random_per_budget=RANDOM_PER_BUDGET,
                          sensitivity_batches=SENSITIVITY_BATCHES)
    report = find_subnets(model, batches[:SENSITIVITY_BATCHES], batches, search)
    metrics = subnet_metrics(report.summary())
    client = MlflowClient(tracking_uri=tracking_uri)
    from mlflow.entities import Metric
    client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in sorted(metrics.items())])
    client.log_dict(run_id, {"layers": report.layer_names, "eigenvalues": report.eigenvalues,
                             "subnets": report.rows()}, "analysis/subnets_table6.json")
    log_figures((client, run_id), search_figures(report, caption(client.get_run(run_id))), ARTIFACT_DIR)
    return metrics


def _first_images(batches, limit: int):
    """Batches until `limit` images have been read."""
    seen = 0
    for images, labels in batches:
        if seen >= limit:
            return
        seen += len(labels)
        yield images, labels


def table6_figures(arch: str, outcome, data_cfg, *, tracking_uri: str | None) -> dict[str, float]:
    """search_final_model for one architecture's final outcome; on any error a warning line and {}."""
    try:
        if not outcome.ok or not outcome.run_id or not outcome.model_uri:
            return {}
        metrics = search_final_model(outcome.model_uri, outcome.run_id, data_cfg, tracking_uri=tracking_uri)
        print(f"[pipeline] {arch}: Table 6 sub-net search logged to run {outcome.run_id[:8]}", flush=True)
        return metrics
    except Exception as err:  # a by-product: the trained model and its metrics stand
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"[pipeline] WARNING: Table 6 of {arch} not computed: {type(err).__name__}: {first}", flush=True)
        return {}

"""The deployment commands behind pipelines/find_subnets.py and pipelines/export.py."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from orchestrator import atomic

from .config import ExportConfig, FindSubnetsConfig


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"


def find_subnets_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Search, evaluate and plot sub-nets of a trained Bit-Mixer meta-network "
                                            "(paper section 4.2); results go to MLflow.")
    p.add_argument("--model", required=True, help="model.pt, a folder holding it, an exported artifact or an MLflow URI")
    p.add_argument("--avg-bits", type=float, nargs="+", default=[2.5, 3.0, 3.5])
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--random", type=int, default=5, help="random assignments of the same total bits per budget")
    p.add_argument("--bitops-fractions", type=float, nargs="*", default=[],
                   help="BitOPs budgets as fractions of the all-max-bits BitOPs")
    p.add_argument("--sensitivity-batches", type=int, default=2)
    p.add_argument("--max-iterations", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="digits", help="'digits' or a folder written by pipelines/prepare_data.py")
    p.add_argument("--work-dir", default=".bitmixer/deploy-data")
    p.add_argument("--val-resolution", type=int, default=32)
    p.add_argument("--val-crop-ratio", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="bitmixer-deploy")
    p.add_argument("--run-name", default=None)
    p.add_argument("--out-dir", default=None, help="also write the figures and subnets.json here")
    return p


def find_subnets_main(argv: list[str] | None = None) -> int:
    args = find_subnets_parser().parse_args(argv)
    try:
        cfg = FindSubnetsConfig.model_validate({  # nested data, so an error names its path (search.top_k)
            "model": args.model,
            "search": {"average_bits": args.avg_bits, "top_k": args.top_k, "random_per_budget": args.random,
                       "bitops_fractions": args.bitops_fractions, "sensitivity_batches": args.sensitivity_batches,
                       "max_iterations": args.max_iterations, "tolerance": args.tolerance, "seed": args.seed},
            "data": {"data": args.data, "work_dir": args.work_dir, "val_resolution": args.val_resolution,
                     "val_crop_ratio": args.val_crop_ratio, "batch_size": args.batch_size,
                     "max_batches": args.max_batches},
            "tracking": {"tracking_uri": args.tracking_uri, "experiment": args.experiment, "run_name": args.run_name},
            "out_dir": args.out_dir,
        })
    except ValidationError as err:
        return _fail(_validation_message(err))
    from .data import validation_batches

    try:
        batches = validation_batches(cfg.data)
        run_id, summary = run_find_subnets(cfg, batches)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    print(json.dumps({"mlflow_run_id": run_id, **summary}, indent=1))
    return 0


def run_find_subnets(cfg: FindSubnetsConfig, batches) -> tuple[str, dict]:
    """Load, search, evaluate, plot, log. Returns (MLflow run id, summary metrics)."""
    from mlflow.tracking import MlflowClient

    from .mlflow_log import log_figures, log_json, log_metrics
    from orchestrator.tracking.credentials import redact_uri

    from .model_source import load_model_source
    from .plots import analysis_figures, subnet_figures
    from .subnets import find_subnets

    loaded = load_model_source(cfg.model, cfg.tracking.tracking_uri)
    report = find_subnets(loaded.model, batches, batches, cfg.search)
    figures = subnet_figures(report)
    eig = dict(zip(report.layer_names, report.eigenvalues))
    figures.update(analysis_figures(loaded.model, batches, eigenvalues=eig))
    # An explicit client: the process-wide MLflow tracking URI and active run are left alone.
    client = MlflowClient(cfg.tracking.tracking_uri) if cfg.tracking.tracking_uri else MlflowClient()
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
    run_id = client.create_run(experiment_id, run_name=cfg.tracking.run_name).info.run_id
    target = (client, run_id)
    status = "FAILED"
    try:
        params = {"model": redact_uri(cfg.model), "model_name": loaded.model_name, **cfg.search.model_dump()}
        for key, value in params.items():
            client.log_param(run_id, key, json.dumps(value) if isinstance(value, list) else value)
        log_metrics(target, report.summary())
        log_json(target, {"layers": report.layer_names, "eigenvalues": report.eigenvalues, "macs": report.macs,
                          "subnets": report.rows()}, "subnets/subnets.json")
        log_figures(target, figures, "subnets")
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            with atomic.atomic_file(out / name) as f:
                fig.savefig(f, format=Path(name).suffix.lstrip(".") or "png")
        atomic.write_text(out / "subnets.json", json.dumps({"eigenvalues": eig, "subnets": report.rows(),
                                                            "summary": report.summary()}, indent=1))
    return run_id, report.summary()


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a trained meta-network as one compact artifact with packed "
                                            "n-bit integer weights (paper section 3.1).")
    p.add_argument("--model", required=True, help="model.pt, a folder holding it, or an MLflow URI")
    p.add_argument("--out", required=True, help="artifact file to write (written to a temporary name, then renamed)")
    p.add_argument("--lower-bits", default="exact", choices=["exact", "derived"],
                   help="exact: every bit-width reproduces the trained model; derived: only the n-bit integers "
                        "(the paper's claim; lower bit-widths re-quantized from them)")
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    try:
        cfg = ExportConfig(model=args.model, out=args.out, lower_bits=args.lower_bits)
    except ValidationError as err:
        return _fail(_validation_message(err))
    from bitmixer_core.export import export_meta_network

    from .model_source import load_model_source

    try:
        loaded = load_model_source(cfg.model)
        report = export_meta_network(loaded.model, loaded.model_name, loaded.build_kwargs, cfg.out,
                                     lower_bits=cfg.lower_bits)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    print(json.dumps({"out": cfg.out, "artifact_bytes": report.artifact_bytes,
                      "fp32_state_dict_bytes": report.fp32_state_dict_bytes, "ratio": round(report.ratio, 4),
                      "packed_weight_bytes": report.packed_weight_bytes,
                      "lower_bit_choice_bytes": report.lower_bit_choice_bytes,
                      "verbatim_weights": report.verbatim_weights}, indent=1))
    return 0

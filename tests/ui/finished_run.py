"""A finished small pipeline run in an MLflow store, built with the logging functions the pipeline itself
uses (tables, stage metrics over several epochs, per-bit tables, model.pt, analysis figures) instead of
training: the UI sees exactly what a real run leaves, in seconds.

    ids = record_finished_run(tracking_uri, tmp_path)   # -> {"experiment", "pipeline", "stage3", ...}
"""
from __future__ import annotations

from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "embedded.yaml"
EPOCHS = 3
BITS = [2, 3, 4]
# Top-1 (%) per epoch, rising as a trained meta-network's would: bit-width -> [epoch 0, 1, 2].
CURVES = {2: [41.0, 63.5, 72.25], 3: [48.0, 70.0, 80.5], 4: [50.0, 72.0, 82.0], "rand": [45.0, 66.0, 76.0]}


def reported_metrics(epoch: int, *, fixed_bits: int | None = None) -> dict:
    """What a worker reports after an evaluated epoch: evaluate_stage's names plus the loop's own."""
    from orchestrator.engine.evaluation import (RAND_TOP1, RAND_TOP1_STD, RAND_TOP5, RAND_TOP5_STD, VAL_IMAGES,
                                                top1_key, top5_key)
    metrics = {"epoch": epoch, "train_loss": 2.3 / (epoch + 1), "lr": 5e-3 * (0.5 ** epoch),
               "epoch_time_s": 1.5, "global_step": 45 * (epoch + 1), "resumed_at_epoch": -1, "subnet_draws": 45,
               VAL_IMAGES: 359, RAND_TOP1: CURVES["rand"][epoch], RAND_TOP1_STD: 1.0,
               RAND_TOP5: 95.0, RAND_TOP5_STD: 0.5}
    for b in BITS:
        shift = 5.0 if fixed_bits == b else 0.0
        metrics[top1_key(b)], metrics[top5_key(b)] = CURVES[b][epoch] + shift, 95.0
    return metrics


def _stage_run(cfg, parent_run_id: str, work: Path) -> str:
    """One stage run: opened, EPOCHS epochs recorded by the worker's own rank-0 step, closed FINISHED."""
    from orchestrator.engine.config import config_hash
    from orchestrator.engine.evaluation import per_bit_table
    from orchestrator.engine.worker import _record_epoch
    from orchestrator.tracking.stage_run import (TAG_ARCHITECTURE, TAG_CONFIG_HASH, TAG_STAGE, RunLogger,
                                                 close_stage_run, open_stage_run)
    run_id = open_stage_run(tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
                            run_name=cfg.tracking.run_name, parent_run_id=parent_run_id,
                            resolved_config=cfg.model_dump(mode="json"),
                            tags={TAG_STAGE: cfg.policy.stage, TAG_ARCHITECTURE: cfg.model.name,
                                  TAG_CONFIG_HASH: config_hash(cfg)})
    logger = RunLogger(cfg.tracking.tracking_uri, run_id)
    torch.manual_seed(0)
    net = cfg.model.build()
    fixed = cfg.policy.fixed_bits if cfg.policy.stage == "independent" else None
    for epoch in range(EPOCHS):
        metrics = reported_metrics(epoch, fixed_bits=fixed)
        table = per_bit_table(metrics, bits=BITS, stage=cfg.policy.stage, first_last=cfg.model.first_last,
                              bits_weights=list(cfg.model.bits_weights))
        folder = work / f"{run_id}-e{epoch}"
        folder.mkdir(parents=True)
        _record_epoch(cfg, logger, net, folder, metrics, table, last=epoch == EPOCHS - 1)
    close_stage_run(cfg.tracking.tracking_uri, run_id, succeeded=True)
    return run_id


def record_finished_run(tracking_uri: str, work: Path) -> dict[str, str]:
    """The embedded preset's pipeline run with Stage II and III of resnet_tiny, its 4-bit Independent
    network, the tables, headline figures and the final model's analysis figures. Returns the ids."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline.analysis import log_stage_analysis
    from orchestrator.pipeline.app import _experiment, log_tables, resolved_config
    from orchestrator.pipeline.config import load_pipeline_config
    from orchestrator.pipeline.outcome import headline_metrics, model_uri, per_bit_top1
    from orchestrator.pipeline.paper_tables import build_tables
    from orchestrator.pipeline.plan import build_plan
    from orchestrator.tracking.stage_run import flatten

    cfg = load_pipeline_config(CONFIG)
    cfg.tracking.tracking_uri = tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment(client, cfg, tracking_uri, work)
    plan = build_plan(cfg, data_path=work / "digits", tracking_uri=tracking_uri)
    parent = client.create_run(experiment_id, run_name=f"pipeline-{cfg.name}",
                               tags={"bitmixer.pipeline": cfg.name}).info.run_id
    params = flatten(resolved_config(cfg, data_path=work / "digits", work_dir=work, tracking_uri=tracking_uri))
    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(parent, params=items[i:i + 100])

    ids = {"experiment": experiment_id, "pipeline": parent}
    per_bit = {}
    for key, name in (("resnet_tiny/main/two", "stage2"), ("resnet_tiny/main/three", "stage3"),
                      ("resnet_tiny/independent_4/independent", "indep4")):
        node = plan.nodes[key]
        ids[name] = _stage_run(node.config, parent, work / "checkpoints")
        fixed = node.config.policy.fixed_bits if node.config.policy.stage == "independent" else None
        per_bit[(node.arch, node.variant, node.stage)] = per_bit_top1(reported_metrics(EPOCHS - 1, fixed_bits=fixed),
                                                                      BITS)
    batches = [(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))) for _ in range(2)]
    log_stage_analysis(model_uri(ids["stage3"]), ids["stage3"], batches, tracking_uri=tracking_uri,
                       eigenvalues=True)
    tables = build_tables(per_bit, architectures=[a.name for a in cfg.architectures], bit_keys=["4", "3", "2"],
                          ablation_arch=cfg.ablation_arch.name, ablations=cfg.ablations.model_dump(),
                          main_teacher=cfg.distillation.teacher)
    log_tables(client, parent, tables, work)
    client.log_batch(parent, metrics=[Metric(k, v, 0, 0) for k, v in sorted(headline_metrics(per_bit).items())])
    client.set_terminated(parent, status="FINISHED")
    return ids

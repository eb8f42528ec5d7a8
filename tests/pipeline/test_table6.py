"""Table 6: the section 4.2 sub-net search on a final model, logged to its run, and the table built from it."""
from __future__ import annotations

import os

import torch

from bitmixer_core import build_model, calibrate_activation_step_sizes
from orchestrator.engine.checkpoint import save_model_pt
from orchestrator.pipeline.outcome import FINISHED, StageOutcome, model_uri
from orchestrator.pipeline.paper_tables import PAPER_TABLE6, table6
from orchestrator.pipeline.subnet_table import subnet_metrics, table6_figures

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def test_search_of_a_final_model_is_logged_and_feeds_table6(tmp_path):
    """On a real model.pt behind runs:/ and a real FFCV validation folder, the search logs per budget the
    best searched and the mean random top-1 as metrics of the stage run, and Table 6 shows them between
    Stage III's fixed 4 and 2 bits, each beside the paper's figure."""
    from mlflow.tracking import MlflowClient

    from orchestrator.data.config import DataConfig
    from tests.data.helpers import make_indexed_data_folder

    data = make_indexed_data_folder(tmp_path / "data", train=20, val=24)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.create_experiment("t6", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp, run_name="stage3 resnet_tiny").info.run_id
    torch.manual_seed(0)
    kwargs = {"num_classes": 24, "stem": "small"}
    net = build_model("resnet_tiny", **kwargs)
    calibrate_activation_step_sizes(net, torch.randn(8, 3, 8, 8))
    client.log_artifact(run_id, str(save_model_pt(tmp_path / "m" / "model.pt", net=net, model_name="resnet_tiny",
                                                  build_kwargs=kwargs, stage="three", epoch=0, metrics={})))
    cfg = DataConfig(path=str(data), train_resolution=8, val_resolution=8, val_crop_ratio=1.0, batch_size=8,
                     num_workers=1)
    outcome = StageOutcome(key="resnet_tiny/main/three", status=FINISHED, run_id=run_id, model_uri=model_uri(run_id))
    figures = table6_figures("resnet_tiny", outcome, cfg, tracking_uri=tracking_uri)
    assert set(figures) == {f"subnets/avg{b}/{kind}_{stat}_top1" for b in ("2.5", "3", "3.5")
                            for kind in ("top", "random") for stat in ("best", "mean")}
    logged = client.get_run(run_id).data.metrics
    assert {k: logged[k] for k in figures} == figures
    listed = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert "analysis/subnets_table6.json" in listed
    # The same search draws the final model's Fig. 4 (top-1 against average bits and BitOPs) and Fig. 5.
    assert {"analysis/fig4_top1_vs_average_bits.png", "analysis/fig4_top1_vs_bitops.png",
            "analysis/fig5_layer_eigenvalues.png"} <= listed
    t = table6({("resnet_tiny", "main", "three"): {"4": 81.0, "2": 70.0}}, {"resnet_tiny": figures},
               ["resnet_tiny"], ["4", "3", "2"])
    assert t.columns[2:] == ["4 (ours)", "4 (paper, ImageNet)", "3½ (ours)", "3½ (paper, ImageNet)", "3 (ours)",
                             "3 (paper, ImageNet)", "2½ (ours)", "2½ (paper, ImageNet)", "2 (ours)",
                             "2 (paper, ImageNet)"]
    top, random = t.rows
    assert top[2:4] == [81.0, PAPER_TABLE6["4"]] and top[-2] == 70.0
    assert top[4] == figures["subnets/avg3.5/top_best_top1"] and random[4] == figures["subnets/avg3.5/random_mean_top1"]


def test_a_failed_search_is_a_warning_not_a_failed_pipeline(tmp_path, capsys):
    outcome = StageOutcome(key="a/main/three", status=FINISHED, run_id="nope", model_uri=str(tmp_path / "none.pt"))
    assert table6_figures("a", outcome, None, tracking_uri=f"sqlite:///{tmp_path}/m.db") == {}
    assert "WARNING: Table 6 of a not computed" in capsys.readouterr().out
    assert subnet_metrics({"avg_bits=2.5/top_best_top1": 1.0, "bitops<=0.5/top_best_top1": 2.0}) == {
        "subnets/avg2.5/top_best_top1": 1.0}


def test_the_pipelines_tables_hold_table6_from_each_architectures_final_model():
    """The pipeline's tables take Table 6 from the first seed's main Stage III run (the final model the
    search ran on), never from an ablation or another seed's replica; no search, no Table 6."""
    from pathlib import Path

    from orchestrator.pipeline.app import subnet_figures, table_outcomes
    from orchestrator.pipeline.config import load_pipeline_config
    from orchestrator.pipeline.paper_tables import build_tables
    from orchestrator.pipeline.plan import build_plan
    cfg = load_pipeline_config(Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "fidelity.yaml")
    plan = build_plan(cfg, data_path="/data", tracking_uri="sqlite:////tmp/x.db")
    searched = {"subnets/avg3/top_best_top1": 77.0, "subnets/avg3/random_mean_top1": 66.0}
    outcomes = {}
    for key, node in plan.nodes.items():
        metrics = {"val/top1_4bit": 90.0, "val/top1_3bit": 85.0, "val/top1_2bit": 80.0}
        if node.stage == "three":  # only the final model's search may reach the table
            metrics.update(searched if (node.variant == "main" and not node.replica)
                           else {k: 1.0 for k in searched})
        outcomes[key] = StageOutcome(key=key, status=FINISHED, metrics=metrics)
    subnets = subnet_figures(plan, outcomes)
    assert subnets == {"resnet_tiny": searched}
    tables = {t.name: t for t in build_tables(table_outcomes(plan, outcomes), architectures=["resnet_tiny"],
                                              bit_keys=["4", "3", "2"], ablation_arch="resnet_tiny",
                                              ablations={}, main_teacher="none", subnets=subnets)}
    assert 77.0 in tables["table6"].rows[0] and 66.0 in tables["table6"].rows[1]
    assert "table6" not in {t.name for t in build_tables({}, architectures=["resnet_tiny"], bit_keys=["4", "3", "2"],
                                                         ablation_arch="resnet_tiny", ablations={},
                                                         main_teacher="none", subnets={})}

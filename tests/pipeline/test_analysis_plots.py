"""The pipeline logs the paper's analysis figures of a final Stage III model into that stage's MLflow run."""
from __future__ import annotations

import os

import pytest
import torch

from bitmixer_core import build_model
from orchestrator.engine.checkpoint import save_model_pt
from orchestrator.pipeline.analysis import analyse_final_stage, log_stage_analysis
from orchestrator.pipeline.outcome import FINISHED, StageOutcome, model_uri

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

BUILD_KWARGS = {"num_classes": 10, "stem": "small"}


@pytest.fixture()
def stage_run(tmp_path):
    """A FINISHED-like Stage III run in a sqlite MLflow store whose artifacts hold a resnet_tiny model.pt."""
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.create_experiment("analysis", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp, run_name="stage3 resnet_tiny k0.667 ramp1 linear",
                               tags={"bitmixer.stage": "three", "bitmixer.architecture": "resnet_tiny"}).info.run_id
    torch.manual_seed(0)
    net = build_model("resnet_tiny", **BUILD_KWARGS)
    path = save_model_pt(tmp_path / "out" / "model.pt", net=net, model_name="resnet_tiny",
                         build_kwargs=BUILD_KWARGS, stage="three", epoch=0, metrics={})
    client.log_artifact(run_id, str(path))
    return client, tracking_uri, run_id


def _batches(n=2):
    return [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(n)]


def test_analysis_figures_are_logged_as_pngs_under_analysis(stage_run):
    """Fig. 3, 6 and 7 of the model.pt behind a runs:/ URI land as PNGs under analysis/ of that same run."""
    client, tracking_uri, run_id = stage_run
    paths = log_stage_analysis(model_uri(run_id), run_id, _batches(), tracking_uri=tracking_uri, eigenvalues=False)
    listed = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert set(paths) == listed
    assert {"analysis/fig3_tbn_variance.png", "analysis/fig6_weight_distributions.png",
            "analysis/fig7_step_sizes.png"} <= listed
    assert all(p.endswith(".png") for p in listed)
    assert "model.pt" in {a.path for a in client.list_artifacts(run_id)}  # the model is left as it was


def test_each_figure_names_itself_and_its_run(stage_run, monkeypatch):
    """Every PNG's title names its figure (Fig. N), the architecture, the stage and the run; every axis that
    carries data is labelled; with eigenvalues on, Fig. 4 (top-1 against average bits and against BitOPs)
    and Fig. 5 come from the sub-net search."""
    from orchestrator.deploy import mlflow_log
    client, tracking_uri, run_id = stage_run
    drawn = {}
    real = mlflow_log.log_figures

    def keep(target, figures, artifact_dir):
        drawn.update(figures)
        return real(target, figures, artifact_dir)
    monkeypatch.setattr(mlflow_log, "log_figures", keep)
    paths = log_stage_analysis(model_uri(run_id), run_id, _batches(), tracking_uri=tracking_uri, eigenvalues=True)
    assert {p.removeprefix("analysis/") for p in paths} == {
        "fig3_tbn_variance.png", "fig4_top1_vs_average_bits.png", "fig4_top1_vs_bitops.png",
        "fig5_layer_eigenvalues.png", "fig6_weight_distributions.png", "fig7_step_sizes.png"}
    for name, fig in drawn.items():
        title = fig._suptitle.get_text()
        number = name.split("_")[0].removeprefix("fig")
        assert title.startswith(f"Fig. {number}:"), (name, title)
        assert f"resnet_tiny, Stage III, run stage3 resnet_tiny k0.667 ramp1 linear ({run_id[:8]})" in title
        assert fig.axes[0].get_ylabel() and all(ax.get_xlabel() for ax in fig.axes), name


def test_plotting_failure_is_a_warning_naming_the_architecture(stage_run, capsys):
    """A failure while plotting (here: unusable data config) never raises: one warning line names the arch."""
    client, tracking_uri, run_id = stage_run
    outcome = StageOutcome(key="resnet_tiny/main/three", status=FINISHED, run_id=run_id, model_uri=model_uri(run_id))
    assert analyse_final_stage("resnet_tiny", outcome, None, tracking_uri=tracking_uri) == []
    out = capsys.readouterr().out
    assert "WARNING: analysis plots of resnet_tiny not logged" in out
    assert client.list_artifacts(run_id, "analysis") == []


def test_failed_stage_is_not_analysed(stage_run, capsys):
    """A Stage III that did not finish has no model to plot: nothing is logged and no warning is printed."""
    _, tracking_uri, _ = stage_run
    outcome = StageOutcome(key="resnet_tiny/main/three", status="failed", error="boom")
    assert analyse_final_stage("resnet_tiny", outcome, None, tracking_uri=tracking_uri) == []
    assert "WARNING" not in capsys.readouterr().out

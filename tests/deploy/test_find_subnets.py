"""Sub-net search on the trained tiny model, the deployment CLIs, and MLflow logging of every figure."""
import json

import pytest
import torch

import bitmixer_core as core
from bitmixer_core.export import load_meta_network
from orchestrator.deploy.cli import export_main, find_subnets_main, run_find_subnets
from orchestrator.deploy.config import FindSubnetsConfig, SearchConfig
from orchestrator.deploy.model_source import load_model_source, save_checkpoint
from orchestrator.deploy.plots import log_analysis_plots
from orchestrator.deploy.subnets import find_subnets

from .digits import BUILD_KWARGS, MODEL_NAME


def _small(val, n=32):
    """One small batch: the Hessian-vector products cost a backward pass per layer per iteration."""
    return [(val[0][0][:n], val[0][1][:n])]


def test_search_evaluates_top_and_random_subnets_within_each_budget(trained_tiny):
    """Every 'top' and 'random' sub-net has exactly the budget's total bits; BitOPs ones stay under it."""
    model, val = trained_tiny
    cfg = SearchConfig(average_bits=[3.0], top_k=3, random_per_budget=2, bitops_fractions=[0.5], max_iterations=3)
    report = find_subnets(model, _small(val), val[:1], cfg)
    n = len(report.layer_names)
    avg = [s for s in report.subnets if s.budget == "avg_bits=3"]
    assert [s.kind for s in avg] == ["top"] * 3 + ["random"] * 2
    assert all(sum(s.bits) == 3 * n for s in avg)
    full = max(s.bitops for s in report.subnets if s.kind == "fixed")
    assert all(s.bitops <= 0.5 * full for s in report.subnets if s.budget == "bitops<=0.5")
    scores = [s.score for s in avg if s.kind == "top"]
    assert scores == sorted(scores, reverse=True)
    assert "avg_bits=3/top_best_top1" in report.summary()


def test_export_cli_writes_a_loadable_artifact_from_a_checkpoint(trained_tiny, tmp_path, capsys):
    """pipelines/export.py on a model.pt writes an artifact that loads and matches the checkpoint's top-1."""
    model, val = trained_tiny
    ckpt = save_checkpoint(tmp_path / "run" / "model.pt", model, MODEL_NAME, BUILD_KWARGS)
    assert export_main(["--model", str(ckpt.parent), "--out", str(tmp_path / "m.bmx")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["ratio"] < 1 and printed["verbatim_weights"] == 0
    loaded, _ = load_meta_network(tmp_path / "m.bmx")
    again = load_model_source(str(tmp_path / "m.bmx")).model  # artifacts are valid model sources too
    for net in (loaded, again):
        assert core.evaluate_fixed_bits(net, val, 3)["top1"] == core.evaluate_fixed_bits(model, val, 3)["top1"]


def test_cli_refuses_bad_input_with_one_sentence(tmp_path, capsys):
    """A missing checkpoint, a non-checkpoint file and a bad option each give an error naming the problem."""
    assert export_main(["--model", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.bmx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    torch.save({"weights": 1}, tmp_path / "other.pt")
    assert export_main(["--model", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x.bmx")]) == 2
    assert "lacks ['model_name', 'build_kwargs', 'state_dict']" in capsys.readouterr().err
    assert find_subnets_main(["--model", "m.pt", "--top-k", "0"]) == 2
    assert "search.top_k" in capsys.readouterr().err
    assert not (tmp_path / "x.bmx").exists()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from tests.servers import MLflowServer  # tests/servers.py: sqlite backend, waits for /health, stops by PID

    with MLflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.mark.integration
def test_find_subnets_logs_table_metrics_and_all_figures_to_a_real_mlflow_server(trained_tiny, tmp_path, mlflow_server):
    """Against a real `mlflow server`: the model is read from a runs:/ URI; Fig. 3-7 and Fig. 4 arrive as PNG
    artifacts, plus subnets.json and summary metrics; the process-wide tracking URI is left alone."""
    import mlflow
    from mlflow.tracking import MlflowClient

    model, val = trained_tiny
    ckpt = save_checkpoint(tmp_path / "model.pt", model, MODEL_NAME, BUILD_KWARGS)
    client = MlflowClient(mlflow_server.uri)
    training_run = client.create_run(client.create_experiment("training")).info.run_id
    client.log_artifact(training_run, str(ckpt))
    before = mlflow.get_tracking_uri()
    cfg = FindSubnetsConfig(
        model=f"runs:/{training_run}/model.pt",
        search=SearchConfig(average_bits=[2.5, 3.5], top_k=2, random_per_budget=2, bitops_fractions=[0.4],
                            max_iterations=3, sensitivity_batches=1),
        tracking={"tracking_uri": mlflow_server.uri, "experiment": "deploy-test"},
        out_dir=str(tmp_path / "out"),
    )
    run_id, summary = run_find_subnets(cfg, _small(val))
    assert mlflow.get_tracking_uri() == before
    assert client.get_run(run_id).info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run_id, "subnets")}
    expected = {"subnets/subnets_top1_vs_average_bits.png", "subnets/subnets_top1_vs_bitops.png",
                "subnets/fig3_tbn_variance.png", "subnets/fig5_layer_eigenvalues.png",
                "subnets/fig6_weight_distributions.png", "subnets/fig7_step_sizes.png", "subnets/subnets.json"}
    assert expected <= names
    png = client.download_artifacts(run_id, "subnets/fig3_tbn_variance.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    metrics = client.get_run(run_id).data.metrics
    assert metrics["avg_bits_2.5/top_best_top1"] == summary["avg_bits=2.5/top_best_top1"]
    assert (tmp_path / "out" / "subnets.json").is_file()
    # the engine / pipeline entry point for a trained model: Fig. 3, 5, 6, 7 into any run
    paths = log_analysis_plots(model, _small(val), (client, training_run), eigenvalues={"a": 1.0, "b": 2.0})
    assert {a.path for a in client.list_artifacts(training_run, "analysis")} == set(paths) and len(paths) == 4

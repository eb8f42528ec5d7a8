"""A model file is data: a crafted model.pt cannot run code through any path that loads a model.

The crafted file is a real checkpoint of the tiny ResNet with one extra object whose `__reduce__` opens a
marker file for writing: an unpickler that honours it creates the marker. Every way in (a stage's
`init_from` and its teacher, as the Ray worker calls them; an MLflow `runs:/` URI and an `s3://` object;
`pipelines/find_subnets.py` and `pipelines/export.py` as processes) must leave the marker uncreated and
say in one sentence why the file was refused. Sources other than a local path, runs:/, models:/ and s3://
are refused before anything is downloaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bitmixer_core as core
from orchestrator.engine.checkpoint import (UnsafeModelFile, load_model, load_weights, read_model_pt,
                                            save_model_pt)

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "resnet_tiny"
BUILD_KWARGS = {"num_classes": 10, "bits": {"weights": [2, 3, 4], "activations": [2, 3, 4]}, "stem": "small",
                "first_last": "fp32", "bn": "transitional",
                "quantizer": {"rounding": "floor", "symmetric": True, "nesting": "scale"}}
REFUSAL = "holds Python objects besides tensors and plain data"


class _OpensMarker:
    """Unpickled, it calls open(marker, "w"): the stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _genuine(path: Path) -> Path:
    net = core.build_model(MODEL_NAME, **BUILD_KWARGS)
    return save_model_pt(path, net=net, model_name=MODEL_NAME, build_kwargs=BUILD_KWARGS, stage="one", epoch=2,
                         metrics={"epoch": 2, "train_loss": 0.5, "lr": 1e-3, "resumed_at_epoch": None,
                                  "subnet_draws": 90, "val/top1_4bit": 80.0})


def _crafted(folder: Path, marker: Path) -> Path:
    """A genuine model.pt whose metrics carry one object that creates `marker` when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _genuine(folder / "model.pt")
    payload = torch.load(path, weights_only=True)
    payload["metrics"]["note"] = _OpensMarker(marker)
    torch.save(payload, path)
    return path


@pytest.fixture
def crafted(tmp_path):
    marker = tmp_path / "code-ran"
    path = _crafted(tmp_path / "crafted", marker)
    yield path, marker
    assert not marker.exists(), "the crafted model.pt ran code while it was loaded"


def test_crafted_file_is_armed(tmp_path):
    """Guard of the guard: the crafted file does create its marker when unpickled the unsafe way, so the
    tests below would fail if a loader went back to weights_only=False."""
    marker = tmp_path / "armed"
    path = _crafted(tmp_path / "armed-model", marker)
    code = f"import torch; torch.load({str(path)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert marker.exists()


def test_what_the_engine_saves_loads_as_data(tmp_path):
    """model.pt as save_model_pt writes it (state dict, build kwargs, metrics with None, ints and floats)
    reads back under the weights-only unpickler, and rebuilds the same network."""
    path = _genuine(tmp_path / "model.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    assert payload["model_name"] == MODEL_NAME and payload["build_kwargs"] == BUILD_KWARGS
    net = load_model(str(path))
    assert set(net.state_dict()) == set(payload["state_dict"])


def test_stage_init_from_refuses_a_crafted_file(crafted):
    """init_from goes through load_weights, as the worker calls it: refused with a sentence."""
    path, marker = crafted
    net = core.build_model(MODEL_NAME, **BUILD_KWARGS)
    with pytest.raises(UnsafeModelFile, match=REFUSAL) as info:
        load_weights(net, str(path), expect_model=MODEL_NAME)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_teacher_refuses_a_crafted_file(crafted, tmp_path):
    """The worker's _load_teacher, given a StageConfig whose teacher_uri is the crafted file, refuses it."""
    from orchestrator.engine.config import StageConfig
    from orchestrator.engine.worker import _load_teacher

    path, marker = crafted
    data = tmp_path / "data"
    data.mkdir()
    cfg = StageConfig.model_validate(dict(
        name="teacher-test", model=dict(name=MODEL_NAME, num_classes=10, stem="small"),
        data=dict(path=str(data), batch_size=32), policy=dict(stage="two"),
        distill=dict(teacher="path", teacher_uri=str(path)),
        tracking=dict(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")))
    with pytest.raises(UnsafeModelFile, match=REFUSAL):
        _load_teacher(cfg, torch.device("cpu"))
    assert not marker.exists()


def test_mlflow_run_artifact_refuses_a_crafted_file(crafted, tmp_path):
    """A crafted model.pt logged into an MLflow run and named by runs:/<id>/model.pt is downloaded, then
    refused: the store is not trusted more than a path."""
    from mlflow.tracking import MlflowClient

    path, marker = crafted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("crafted", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(path))
    with pytest.raises(UnsafeModelFile, match=REFUSAL) as info:
        read_model_pt(f"runs:/{run_id}/model.pt", uri)
    assert f"runs:/{run_id}/model.pt" in str(info.value)
    assert not marker.exists()


def test_registered_model_refuses_a_crafted_file(crafted, tmp_path):
    """models:/<name>/<version> of a version whose source holds the crafted model.pt: downloaded from the
    registry of the given tracking URI, then refused."""
    from mlflow.tracking import MlflowClient

    path, marker = crafted
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("crafted", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(path), "model")
    client.create_registered_model("crafted")
    version = client.create_model_version("crafted", source=f"runs:/{run_id}/model", run_id=run_id).version
    with pytest.raises(UnsafeModelFile, match=REFUSAL):
        read_model_pt(f"models:/crafted/{version}", uri)
    assert not marker.exists()


def test_missing_mlflow_model_is_one_sentence(tmp_path):
    """A models:/ or runs:/ reference that names nothing is a FileNotFoundError naming it (the CLIs print
    it as one line), not an MLflow traceback."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError, match="models:/absent/1"):
        read_model_pt("models:/absent/1", uri)


@pytest.mark.integration
def test_s3_object_refuses_a_crafted_file(crafted, tmp_path, monkeypatch):
    """s3://bucket/key (over HTTP on loopback, moto's server) is downloaded, then refused."""
    from tests.servers import MotoServer

    path, marker = crafted
    with MotoServer(tmp_path / "moto") as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        s3.create_bucket("checkpoints")
        s3.client().upload_file(str(path), "checkpoints", "stage1/model.pt")
        with pytest.raises(UnsafeModelFile, match=REFUSAL):
            read_model_pt("s3://checkpoints/stage1/model.pt")
    assert not marker.exists()


@pytest.mark.parametrize("uri", ["http://example.com/model.pt", "https://example.com/model.pt",
                                 "file:///tmp/model.pt", "ftp://example.com/model.pt",
                                 "mlflow-artifacts:/0/abc/artifacts/model.pt"])
def test_other_sources_are_refused_by_name(uri):
    """Any scheme but runs:/, models:/ and s3:// gets one sentence naming the accepted sources."""
    with pytest.raises(ValueError, match=r"runs:/<run_id>/model.pt, models:/<name>/<version> or s3://") as info:
        read_model_pt(uri)
    assert uri in str(info.value)


def test_credentials_in_a_refused_reference_are_not_repeated():
    """A refused URI is quoted without its userinfo."""
    with pytest.raises(ValueError) as info:
        read_model_pt("https://alice:hunter2@example.com/model.pt")
    assert "hunter2" not in str(info.value) and "example.com/model.pt" in str(info.value)


def _cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_export_cli_refuses_a_crafted_file(crafted, tmp_path):
    """pipelines/export.py exits 2 with the sentence on stderr, writes no artifact and runs no code."""
    path, marker = crafted
    out = tmp_path / "model.bmx"
    done = _cli("export.py", "--model", str(path), "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert REFUSAL in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not marker.exists()


def test_export_cli_refuses_a_url(tmp_path):
    """pipelines/export.py --model http://... is refused before any download, naming the accepted sources."""
    done = _cli("export.py", "--model", "http://127.0.0.1:9/model.pt", "--out", str(tmp_path / "m.bmx"),
                cwd=tmp_path)
    assert done.returncode == 2
    assert "runs:/<run_id>/model.pt" in done.stderr and "Traceback" not in done.stderr


def test_find_subnets_cli_refuses_a_crafted_file(crafted, tmp_path):
    """pipelines/find_subnets.py exits 2 with the sentence on stderr and runs no code."""
    path, marker = crafted
    done = _cli("find_subnets.py", "--model", str(path), "--work-dir", str(tmp_path / "deploy-data"),
                "--max-batches", "1", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert REFUSAL in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


@pytest.mark.parametrize("field", ["init_from", "teacher_uri"])
def test_stage_config_refuses_other_sources_before_ray(field, tmp_path):
    """A stage whose init_from or teacher_uri is an http(s) URL fails when its config is read (before Ray
    starts), naming the field and the accepted sources."""
    from pydantic import ValidationError

    from orchestrator.engine.config import StageConfig

    data = tmp_path / "data"
    data.mkdir()
    settings = dict(name="s", model=dict(name=MODEL_NAME, num_classes=10, stem="small"),
                    data=dict(path=str(data), batch_size=32), policy=dict(stage="two"),
                    tracking=dict(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    if field == "init_from":
        settings["init_from"] = "https://example.com/model.pt"
    else:
        settings["distill"] = dict(teacher="path", teacher_uri="https://example.com/model.pt")
    with pytest.raises(ValidationError, match=r"runs:/<run_id>/model.pt, models:/<name>/<version> or s3://") as info:
        StageConfig.model_validate(settings)
    assert field in str(info.value)

"""Bad input stops before Ray, in one sentence, and loses nothing already saved.

Each case runs `pipelines/full_paper.py` in this process on a work dir that already holds a data folder,
an MLflow store with a finished run and a table. The command must exit with code 2 and one `error:`
sentence naming what is wrong and what to do; Ray must not have started; every file of the work dir must
be byte for byte what it was.
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil

import pytest
import yaml

from .conftest import ROOT

EMBEDDED = ROOT / "pipelines" / "configs" / "embedded.yaml"


def _full_paper():
    spec = importlib.util.spec_from_file_location("full_paper", ROOT / "pipelines" / "full_paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A work dir as a finished pipeline leaves it: data, an MLflow store with a FINISHED run, a table."""
    from mlflow.tracking import MlflowClient

    from orchestrator.data.embedded import write_embedded_digits
    work = tmp_path_factory.mktemp("work")
    data = write_embedded_digits(work / "data")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bad-input", artifact_location=(work / "mlartifacts").as_uri())
    run = client.create_run(exp, tags={"bitmixer.status": "FINISHED"})
    client.log_text(run.info.run_id, "weights", "model.pt")
    client.set_terminated(run.info.run_id, "FINISHED")
    (work / "tables").mkdir()
    (work / "tables" / "table7.md").write_text("| a |\n")
    return {"work": work, "data": data, "uri": uri}


def _snapshot(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _config(saved, **changes) -> dict:
    raw = yaml.safe_load(EMBEDDED.read_text())
    raw["work_dir"] = str(saved["work"])
    raw["data"].pop("embedded")
    raw["data"]["path"] = str(saved["data"])
    raw["tracking"] = {"experiment": "bad-input"}
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return raw


def _run(saved, tmp_path, capsys, raw: dict | None = None, text: str | None = None) -> str:
    import ray
    config = tmp_path / "pipeline.yaml"
    config.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
    before = _snapshot(saved["work"])
    code = _full_paper().main(["--config", str(config)])
    lines = capsys.readouterr().err.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, lines
    assert not ray.is_initialized()  # stopped before Ray
    assert _snapshot(saved["work"]) == before  # nothing saved was lost or changed
    return " ".join(line.strip() for line in lines[errors[0]:])  # a config error lists its entries below


def test_missing_data_path(saved, tmp_path, capsys):
    """data.path pointing nowhere is named with the command that makes it."""
    error = _run(saved, tmp_path, capsys, _config(saved, **{"data.path": str(tmp_path / "nowhere")}))
    assert f"The data folder {tmp_path / 'nowhere'} does not exist; create it with" in error
    assert "prepare_data.py" in error


def test_num_classes_not_matching_classes_json(saved, tmp_path, capsys):
    error = _run(saved, tmp_path, capsys, _config(saved, **{"data.num_classes": 1000}))
    assert "has 10 classes (classes.json) but the config says num_classes: 1000; set data.num_classes to 10" in error


def test_foreign_beton(saved, tmp_path, capsys):
    """A .beton that is not FFCV's (here a renamed zip) is named before any worker would assert on it."""
    data = tmp_path / "data"
    shutil.copytree(saved["data"], data)
    (data / "train.beton").write_bytes(b"PK\x03\x04" + bytes(4000))
    error = _run(saved, tmp_path, capsys, _config(saved, **{"data.path": str(data)}))
    assert f"{data / 'train.beton'} is not a data file this pipeline wrote" in error
    assert "write the data folder again with `python pipelines/prepare_data.py`" in error


@pytest.mark.parametrize("weights, activations, says", [
    ([3, 3, 3], [2, 3, 4], "weight bit-widths must be sorted and unique, got (3, 3, 3)"),
    ([4, 3, 2], [2, 3, 4], "weight bit-widths must be sorted and unique, got (4, 3, 2)"),
    ([2, 3, 4], [2, 2, 4], "activation bit-widths must be sorted and unique, got (2, 2, 4)"),
    ([2, 3], [2, 3, 4], "must list as many bit-widths"),
])
def test_inconsistent_bit_sets(saved, tmp_path, capsys, weights, activations, says):
    error = _run(saved, tmp_path, capsys, _config(saved, bits={"weights": weights, "activations": activations}))
    assert f"bits: the bit sets (weights {weights}, activations {activations}) are inconsistent" in error
    assert says in error


def test_zero_stage_three_is_refused(saved, tmp_path, capsys):
    """ZeRO-3 is refused with its reason and what to use, not silently clamped to 2."""
    error = _run(saved, tmp_path, capsys, _config(saved, **{"scaling.zero_stage": 3}))
    assert "scaling.zero_stage: zero_stage 3 is not supported: ZeRO-3 partitions every parameter" in error
    assert "use zero_stage 0, 1 or 2" in error


@pytest.mark.parametrize("path", ["s3:/bucket/prefix", "s3:bucket", "s4://bucket/x", "s3:///prefix"])
def test_bad_storage_path_scheme(saved, tmp_path, capsys, path):
    """`s3:/b` used to become a local folder named `s3:`; now it is refused, saying how to write it."""
    error = _run(saved, tmp_path, capsys, _config(saved, **{"tracking.storage_path": path}))
    assert f"tracking.storage_path: storage path {path!r} is neither a local folder nor a URI like " in error
    assert "write it as <scheme>://<bucket>/<prefix>" in error


@pytest.mark.parametrize("prefix", ["team/bitmixer", "a:b", "-x"])
def test_invalid_registered_model_name(saved, tmp_path, capsys, prefix):
    error = _run(saved, tmp_path, capsys, _config(saved, **{"tracking.registered_model_prefix": prefix}))
    assert f"tracking.registered_model_prefix: {prefix!r} cannot start a registered-model name" in error


def test_duplicate_yaml_key(saved, tmp_path, capsys):
    """A key given twice in one mapping is refused with both lines, instead of the last one silently winning."""
    text = yaml.safe_dump(_config(saved), sort_keys=False).replace("seed: 0\n", "seed: 0\nseed: 1\n", 1)
    error = _run(saved, tmp_path, capsys, text=text)
    assert "pipeline.yaml:3 sets `seed` twice in the same mapping (first on line 2); keep one of them" in error


def test_second_pipeline_on_the_work_dir(saved, tmp_path, capsys):
    """A pipeline started while another holds the work dir is refused before it touches anything."""
    from orchestrator.pipeline.integrity import work_dir_lock
    with work_dir_lock(saved["work"]):
        error = _run(saved, tmp_path, capsys, _config(saved))
    assert f"is running in the work dir {saved['work']}; wait for it to end or give this one another work_dir" in error

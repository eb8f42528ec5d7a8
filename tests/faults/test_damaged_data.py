"""A data folder damaged after it was written (a JPEG in `train.beton` that no longer decodes): the stage
stops with one sentence saying so, and its run ends FAILED, instead of training on black crops or (before
`orchestrator.data.epoch`) a worker waiting for a batch forever.

Real components: a local Ray, 2 Ray Train workers, DeepSpeed on gloo, FFCV on a damaged copy of the embedded
digits, an `mlflow server` process.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.data.helpers import break_jpeg_headers

from .conftest import digits_stage

pytestmark = [pytest.mark.integration, pytest.mark.faults]


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits, mlflow_server):
    import ray

    from orchestrator.data.beton import write_beton
    from orchestrator.data.config import WriterConfig
    from orchestrator.data.embedded import digits_images, stratified_split

    tmp = tmp_path_factory.mktemp("damaged")
    data = tmp / "digits"
    shutil.copytree(digits, data)
    images, labels = digits_images()
    train, _ = stratified_split(labels)
    pairs = list(zip(images[train], labels[train].tolist()))  # the embedded training split, every image a JPEG
    write_beton(pairs, data / "train.beton", WriterConfig(max_resolution=None, workers=1), write_mode="jpg")
    # A few images, so that every rank's first batches still read.
    assert break_jpeg_headers(data / "train.beton", every=50) == len(train)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bitmixer" / "torch_extensions"))
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield {"tmp": tmp, "data": str(data), "mlflow": mlflow_server}
    finally:
        ray.shutdown()


def test_a_damaged_jpeg_stops_the_stage_in_one_sentence_and_its_run_fails(env):
    from mlflow.tracking import MlflowClient

    from orchestrator.data import DataError
    from orchestrator.engine import run_stage
    cfg = digits_stage("damaged", data=env["data"], tracking_uri=env["mlflow"].uri,
                       storage_path=str(env["tmp"] / "ray"), epochs=1, max_failures=0)
    with pytest.raises(DataError) as raised:
        run_stage(cfg)
    message = str(raised.value)
    assert message.startswith("stage damaged stopped: reading a batch failed (ValueError: a JPEG image in the "
                              ".beton does not decode: the file was damaged after it was written)"), message
    assert "pipelines/prepare_data.py" in message and "\n" not in message
    client = MlflowClient(env["mlflow"].uri)
    (run,) = client.search_runs([client.get_experiment_by_name("damaged").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["bitmixer.status"] == "FAILED"

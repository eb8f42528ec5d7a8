"""The disk filling during a checkpoint: the stage stops with one sentence saying what to do, the run ends
FAILED, the last good checkpoint is intact, and once there is room again the re-run resumes from it.

Ray's checkpoint storage is a small tmpfs mounted for the test (it needs the right to mount; skipped
where there is none); after epoch 0 is recorded a filler file takes the rest of it.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.engine.callbacks import PauseAfterFirstEpoch

from .conftest import digits_stage, run_stage_in_thread, wait_for_pause

pytestmark = [pytest.mark.integration, pytest.mark.faults]
EPOCHS = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory, digits, mlflow_server):
    import ray

    tmp = tmp_path_factory.mktemp("disk-full")
    store = tmp / "store"
    store.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(store)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()})")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "bitmixer" / "torch_extensions"))
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            yield {"tmp": tmp, "store": store, "data": digits, "mlflow": mlflow_server}
        finally:
            ray.shutdown()
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def _fill(folder: Path) -> Path:
    """Take every free byte of the file system of `folder`."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_full_disk_during_a_checkpoint(env):
    from mlflow.tracking import MlflowClient

    from orchestrator.engine import run_stage
    from orchestrator.engine.stage import StorageFull
    cfg = digits_stage("disk-full", data=env["data"], tracking_uri=env["mlflow"].uri, storage_path=str(env["store"]),
                       epochs=EPOCHS, eval_every_epochs=EPOCHS,
                       max_failures=0)  # a retry would meet the same full disk
    marker, go = env["tmp"] / "paused", env["tmp"] / "go"
    thread, box = run_stage_in_thread(cfg, [PauseAfterFirstEpoch(str(marker), str(go))])
    wait_for_pause(marker, thread, box)
    checkpoints = sorted(p for p in env["store"].rglob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 1
    good = {p.relative_to(checkpoints[0]): p.read_bytes() for p in checkpoints[0].rglob("*") if p.is_file()}
    filler = _fill(env["store"])
    go.write_text("go")
    thread.join(timeout=900)
    assert not thread.is_alive()

    error = box.get("error")
    assert isinstance(error, StorageFull), repr(error)[:3000]
    assert str(error).startswith("stage disk-full stopped: a disk ran out of space (No space left on device)")
    assert "the stage resumes from its last recorded checkpoint, which is intact" in str(error)
    client = MlflowClient(env["mlflow"].uri)
    exp = client.get_experiment_by_name("disk-full")
    (failed,) = client.search_runs([exp.experiment_id])
    assert failed.info.status == "FAILED"
    assert {p.relative_to(checkpoints[0]): p.read_bytes()
            for p in checkpoints[0].rglob("*") if p.is_file()} == good  # the last good checkpoint, intact

    filler.unlink()  # room again: the re-run resumes from epoch 1 and finishes
    result = run_stage(cfg)
    assert result.metrics["resumed_at_epoch"] == 1 and result.metrics["epoch"] == EPOCHS - 1
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}

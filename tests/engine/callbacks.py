"""Callbacks the engine tests pass to `run_stage`: test machinery that is not part of the product."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from orchestrator.engine.callbacks import StageCallback


class SubnetFingerprints(StageCallback):
    """Every rank's fingerprint of its sub-net draws, gathered into rank 0's report as `subnet_digests`
    (run_stage hands them on as StageResult.subnet_digests): equal fingerprints = the same sub-nets."""

    def on_epoch_end(self, worker, epoch, metrics):
        import torch.distributed as dist
        digests = [None] * worker.world_size
        if dist.is_initialized():
            dist.all_gather_object(digests, worker.sampler.digest)
        else:
            digests = [worker.sampler.digest]
        metrics["subnet_digests"] = digests


class MlflowImported(StageCallback):
    """Whether each rank's process has imported mlflow, gathered into rank 0's report as `mlflow_imported`
    (in rank order): only the rank that logs needs it."""

    def on_epoch_end(self, worker, epoch, metrics):
        import sys

        import torch.distributed as dist
        imported = [None] * worker.world_size
        if dist.is_initialized():
            dist.all_gather_object(imported, "mlflow" in sys.modules)
        else:
            imported = ["mlflow" in sys.modules]
        metrics["mlflow_imported"] = imported


def recorded(run_dir: str | None, epoch: int) -> bool:
    """Whether Ray's checkpoint_manager_snapshot.json of the run holds the epoch's checkpoint."""
    if run_dir is None:
        return False
    try:
        results = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return any(r.get("metrics", {}).get("epoch") == epoch for r in results.get("checkpoint_results", []))


class CrashAfterEpoch(StageCallback):
    """Rank 1 (or 0 alone) exits hard after `epoch`, once (a marker file remembers it).

    It first waits (at most 2 minutes) until Ray has recorded that epoch's checkpoint: Ray collects reports
    every ~2 s, and a loaded machine is slower, so an immediate crash could lose the checkpoint and make the
    test's outcome a matter of timing."""

    def __init__(self, epoch: int, marker: str | os.PathLike):
        self.epoch, self.marker = epoch, str(marker)

    def after_report(self, worker, epoch):
        marker = Path(self.marker)
        if epoch != self.epoch or worker.rank != (1 if worker.world_size > 1 else 0) or marker.exists():
            return
        deadline = time.monotonic() + 120.0
        while worker.run_dir is not None and time.monotonic() < deadline and not recorded(worker.run_dir, epoch):
            time.sleep(0.5)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"crashed after epoch {epoch}\n")
        os._exit(1)


def recorded_in_run_dir(worker, epoch: int) -> bool:
    """Whether Ray has recorded the epoch's checkpoint in the worker's run folder."""
    return recorded(worker.run_dir, epoch)


class PauseAfterFirstEpoch(StageCallback):
    """Rank 0, once Ray has recorded epoch 0's checkpoint (`is_recorded(worker, epoch)`), creates `marker` and
    waits until `go` exists (at most 300 s): the fault tests break something at that known point. It pauses
    once; a resumed epoch 0 does not pause again."""

    def __init__(self, marker: str, go: str, is_recorded=None):
        self.marker, self.go = marker, go
        self.is_recorded = is_recorded or recorded_in_run_dir

    def marker_text(self) -> str:
        return "paused"

    def after_report(self, worker, epoch):
        if epoch != 0 or worker.rank != 0 or Path(self.marker).exists():
            return
        while not self.is_recorded(worker, epoch):
            time.sleep(0.2)
        Path(self.marker).write_text(self.marker_text())
        deadline = time.monotonic() + 300
        while not Path(self.go).exists() and time.monotonic() < deadline:
            time.sleep(0.2)

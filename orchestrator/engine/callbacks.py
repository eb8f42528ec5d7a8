"""Hooks into the training loop of every worker, for what is not part of training itself.

The product passes none. Tests pass theirs to `run_stage(cfg, callbacks=[...])`: fault injection (a worker
that exits after an epoch), fingerprints of the sub-net draws, pauses a driver can be killed in. A callback
travels to the workers with the train loop's config (pickled by Ray), so it must be importable there.

    class Fingerprint(StageCallback):
        def on_epoch_end(self, worker, epoch, metrics):
            metrics["my_digest"] = worker.sampler.digest      # reaches StageResult.metrics

`worker` is the `orchestrator.engine.worker.StageWorker` of that rank: cfg, rank, world_size, engine,
sampler, run_dir (Ray's folder of the run, None when it is not local).
"""
from __future__ import annotations


class StageCallback:
    """Override what you need; every method does nothing by default."""

    def on_epoch_end(self, worker, epoch: int, metrics: dict) -> None:
        """Every rank, after the epoch's training and evaluation, before its report: entries added to
        `metrics` are reported with it (rank 0's report is what the driver sees)."""

    def after_report(self, worker, epoch: int) -> None:
        """Every rank, after Ray was given the epoch's metrics and checkpoint."""

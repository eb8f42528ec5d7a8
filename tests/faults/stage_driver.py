"""A stage's driver in a process of its own, for the tests that kill it.

    python -m tests.faults.stage_driver CONFIG_JSON RESULT_JSON [PAUSE_EPOCH MARKER]

Starts a local Ray (2 CPUs), runs `run_stage` on the StageConfig in CONFIG_JSON and writes the result's
run id and metrics to RESULT_JSON. With PAUSE_EPOCH, rank 0 stops after Ray has recorded that epoch's
checkpoint, creates MARKER and waits there, so the test can kill the driver at a known point.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from orchestrator.engine.callbacks import StageCallback
from tests.engine.callbacks import recorded


class PauseAfterEpoch(StageCallback):
    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = epoch, marker

    def after_report(self, worker, epoch):
        if epoch != self.epoch or worker.rank != 0:
            return
        while not recorded(worker.run_dir, epoch):
            time.sleep(0.2)
        Path(self.marker).write_text(f"paused after epoch {epoch}\n")
        time.sleep(3600)  # the test kills the driver (and with it this worker) now


def main(argv: list[str]) -> int:
    import ray

    from orchestrator.engine import StageConfig, run_stage
    cfg = StageConfig.model_validate(json.loads(Path(argv[0]).read_text()))
    callbacks = [PauseAfterEpoch(int(argv[2]), argv[3])] if len(argv) > 2 else []
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    try:
        result = run_stage(cfg, callbacks=callbacks)
    finally:
        ray.shutdown()
    Path(argv[1]).write_text(json.dumps({"run_id": result.mlflow_run_id, "metrics": result.metrics}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

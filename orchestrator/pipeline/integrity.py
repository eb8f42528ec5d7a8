"""What keeps a pipeline's record true when it is stopped, killed or started twice.

- `work_dir_lock`: one pipeline per work dir at a time (`fcntl.flock` on `<work_dir>/.lock`); a second one
  is refused with a sentence. The lock goes with the process, so a killed pipeline never leaves it held.
- `end_stale_runs`: with the lock held, no other pipeline of this work dir is alive, so a pipeline run of
  this work dir still RUNNING in MLflow belongs to a driver that was killed: it and every run still
  RUNNING under it (stages, sweeps, trials) are marked KILLED.
- `end_pipeline_runs`: at the end of a pipeline (finished, failed, SIGTERM, Ctrl-C), every run under it that
  is still RUNNING is marked KILLED, so no run stays RUNNING forever.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

TAG_WORK_DIR = "bitmixer.work_dir"
LOCK_FILE = ".lock"


class WorkDirBusy(RuntimeError):
    """Another pipeline holds the work dir."""


@contextlib.contextmanager
def work_dir_lock(work_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold `<work_dir>/.lock` for the pipeline's lifetime, or raise WorkDirBusy at once."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_FILE
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise WorkDirBusy(f"another pipeline ({holder}) is running in the work dir {work_dir}; wait for it "
                              f"to end or give this one another work_dir.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def end_stale_runs(tracking_uri: str, experiment_id: str, work_dir: str | os.PathLike) -> list[str]:
    """Mark KILLED the RUNNING pipeline runs of this work dir (and their RUNNING descendants); call it with
    the work dir's lock held. Returns the run ids ended."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.stage_run import STATUS_KILLED, TAG_STATUS, end_open_runs
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([experiment_id], max_results=1000,
                              filter_string=f"tags.`{TAG_WORK_DIR}` = '{Path(work_dir).resolve()}' "
                                            f"and attributes.status = 'RUNNING'")
    ended = []
    for run in runs:
        ended += end_open_runs(tracking_uri, run.info.run_id, STATUS_KILLED)
        client.set_tag(run.info.run_id, TAG_STATUS, STATUS_KILLED)
        client.set_terminated(run.info.run_id, status=STATUS_KILLED)
        ended.append(run.info.run_id)
    return ended


def end_pipeline_runs(tracking_uri: str, run_id: str, status: str) -> list[str]:
    """End the pipeline run with `status` after marking KILLED every run under it still RUNNING."""
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.stage_run import STATUS_KILLED, end_open_runs
    ended = end_open_runs(tracking_uri, run_id, STATUS_KILLED)
    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)
    return ended

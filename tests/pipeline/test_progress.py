"""The pipeline's progress report: a line per stage with its state, elapsed time and an estimate, redrawn in
place on a terminal, one plain line per change in a log; running stages are read from the tracking store."""
from __future__ import annotations

import io

import pytest

from orchestrator.pipeline.progress import ProgressBoard, StageState, duration, poll_running


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _board(tty: bool):
    clock = Clock()
    stages = {k: StageState(k, name, 4) for k, name in (("r/main/one", "stage1 r"), ("r/main/two", "stage2 r"),
                                                         ("r/main/three", "stage3 r"))}
    out = io.StringIO()
    return ProgressBoard("embedded", stages, stream=out, tty=tty, clock=clock), clock, out


def test_running_stage_shows_epoch_elapsed_and_estimate():
    """A stage 2 of 4 epochs in after 20 s has ~20 s left; the headline counts done / running / waiting and
    estimates the waiting stages at the pace seen so far."""
    board, clock, _ = _board(tty=False)
    board.running("r/main/one", started=clock.now, epochs_done=0)
    clock.now += 20
    board.running("r/main/one", started=clock.now - 20, epochs_done=2)
    line = board.stage_line(board.stages["r/main/one"])
    assert line.split() == ["running", "stage1", "r", "epoch", "2/4", "20s", "~20s", "left"]
    assert "0/3 done, 1 running, 2 waiting; 20s elapsed, ~" in board.headline()
    assert board.left() == pytest.approx(20 + 2 * 4 * 10)  # the rest of stage 1, then 2 stages of 4 x 10 s
    # Once the epochs' own time is known, the stage's start-up no longer counts in its pace.
    board.running("r/main/one", started=clock.now - 20, epochs_done=2, epoch_seconds=8.0)
    assert board.stages["r/main/one"].left(clock.now) == pytest.approx(8.0)
    clock.now += 20
    board.ended("r/main/one", "finished", "")
    assert "1/3 done, 0 running, 2 waiting" in board.headline()
    assert board.stage_line(board.stages["r/main/one"]).split()[:4] == ["finished", "stage1", "r", "40s"]


def test_log_gets_one_line_per_change():
    """Not a terminal: each change of a stage (status or epoch) is one plain line, followed by the headline;
    nothing is written again while nothing changes, and no terminal control codes appear."""
    board, clock, out = _board(tty=False)
    board.show()
    assert out.getvalue() == ""  # everything waiting: nothing to say yet
    board.running("r/main/one", started=clock.now, epochs_done=1)
    board.show()
    board.show()
    board.ended("r/main/one", "failed", "RuntimeError: boom")
    board.show()
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines if not line.startswith("[pipeline] embedded")] == ["running", "failed"]
    assert lines[-2].endswith("RuntimeError: boom") and "\x1b" not in out.getvalue()


def test_terminal_is_redrawn_in_place():
    """On a terminal the board is drawn once and then overwritten: the cursor moves up over the lines drawn."""
    board, clock, out = _board(tty=True)
    board.show()
    first = out.getvalue()
    assert first.count("\n") == 4 and "\x1b[" not in first.split("\x1b[2K", 1)[0]
    board.running("r/main/two", started=clock.now, epochs_done=1)
    board.show()
    assert out.getvalue()[len(first):].startswith("\x1b[4F")


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_running_stages_are_read_from_the_tracking_store(tmp_path):
    """A RUNNING stage run counts its epochs by its sys/epoch_time_s history; a sweep trial counts for its
    sweep's stage, and the run the trials nest under does not (it trains nothing: counted, it would add a
    trial and hold the stage at 0 epochs); a FINISHED run and a run of another name are not running stages."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    stages = {"r/main/two": StageState("r/main/two", "stage2 r", 3),
              "r/main/three": StageState("r/main/three", "stage3 r", 3)}

    def run(name: str, status: str, epochs: int, **tags: str) -> None:
        run_id = client.create_run(exp, run_name=name, tags={"bitmixer.status": status, **tags}).info.run_id
        client.log_batch(run_id, metrics=[Metric("sys/epoch_time_s", 2.0, 0, e) for e in range(epochs)])
    run("stage2 r", "RUNNING", 2)
    run("stage3 r sweep", "RUNNING", 0, **{"bitmixer.sweep_of": "r/main/three"})
    run("stage3 r k0.667 ramp1 linear", "RUNNING", 2)
    run("stage3 r k0.75 ramp1 linear", "RUNNING", 1)
    run("stage1 r", "RUNNING", 3)       # not a stage of this board
    run("stage3 r k0.8 ramp1 linear", "FINISHED", 3)
    found = poll_running(client, exp, 0, stages)
    assert found["r/main/two"]["epochs_done"] == 2 and found["r/main/two"]["epoch_seconds"] == 4.0
    assert found["r/main/three"]["epochs_done"] == 1 and found["r/main/three"]["note"] == "2 trials"
    assert set(found) == {"r/main/two", "r/main/three"}


@pytest.mark.parametrize("address", [None, "auto"])
def test_ray_worker_output_stays_out_of_the_terminal(address, monkeypatch):
    """The terminal is the progress board: the pipeline's Ray (local, or the cluster of a submitted job) is
    joined with log_to_driver=False, so workers' and the Train controller's lines stay in Ray's log files."""
    import ray

    from orchestrator.pipeline import app

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    app._connect_ray({"MLFLOW_TRACKING_URI": "sqlite:////tmp/x.db"})
    (kwargs,) = calls
    assert kwargs["log_to_driver"] is False
    assert kwargs["runtime_env"] == {"env_vars": {"MLFLOW_TRACKING_URI": "sqlite:////tmp/x.db"}}

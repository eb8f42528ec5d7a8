"""The pipeline's progress report: one line per stage (done, running, waiting), elapsed time and an estimate
of what is left, redrawn in place on a terminal and written as plain lines (one per change) in a log.

The driver learns what runs from the tracking store, which every stage writes anyway: a stage run tagged
RUNNING under this pipeline is running, and its `sys/epoch_time_s` history says how many epochs it has done
and how long they took. So the report is the same on one machine and on a cluster, and needs nothing from
the workers' own output (which the pipeline keeps out of the terminal).
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

WAITING, RUNNING = "waiting", "running"
EPOCH_TIME = "sys/epoch_time_s"


def duration(seconds: float | None) -> str:
    """12s, 4m05s, 1h02m."""
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass
class StageState:
    key: str                        # plan key
    name: str                       # the stage run's name in MLflow ("stage3 resnet_tiny")
    epochs: int
    status: str = WAITING           # waiting / running / an outcome status (finished, skipped, failed, blocked)
    started: float | None = None    # wall-clock time the stage's run started
    ended: float | None = None
    epochs_done: int = 0
    epoch_seconds: float = 0.0      # time spent in the epochs done so far
    note: str = ""

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.ended or now) - self.started

    def left(self, now: float) -> float | None:
        """Estimate for a running stage: the epochs to go at the pace of those done (their own time, without
        the stage's start-up)."""
        if self.status != RUNNING or self.epochs_done == 0:
            return None
        spent = self.epoch_seconds if self.epoch_seconds > 0 else (self.elapsed(now) or 0.0)
        return spent / self.epochs_done * max(self.epochs - self.epochs_done, 0)


@dataclass
class ProgressBoard:
    """The state of every stage of a plan, and its rendering."""

    title: str
    stages: dict[str, StageState]
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    tty: bool | None = None
    clock: Callable[[], float] = time.time
    started: float = 0.0
    _drawn: int = 0
    _last_lines: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.started = self.started or self.clock()
        if self.tty is None:
            self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @classmethod
    def for_plan(cls, plan, title: str, **options) -> "ProgressBoard":
        stages = {key: StageState(key, node.config.tracking.run_name or key, node.config.optim.epochs)
                  for key, node in plan.nodes.items()}
        return cls(title, stages, **options)

    # -- what happened ---------------------------------------------------------------------------------
    def running(self, key: str, *, started: float, epochs_done: int, epoch_seconds: float = 0.0,
                note: str = "") -> None:
        stage = self.stages[key]
        if stage.status not in (WAITING, RUNNING):
            return  # already ended; a late poll must not bring it back
        stage.status, stage.epochs_done, stage.epoch_seconds, stage.note = RUNNING, epochs_done, epoch_seconds, note
        stage.started = min(stage.started or started, started)

    def ended(self, key: str, status: str, note: str = "") -> None:
        stage = self.stages[key]
        now = self.clock()
        stage.status, stage.note = status, note
        if stage.started is not None:
            stage.ended = now
        if status == "finished":
            stage.epochs_done = stage.epochs

    # -- estimates ---------------------------------------------------------------------------------------
    def left(self) -> float | None:
        """What is left of the whole pipeline: running stages at their own pace; a waiting stage as long, per
        epoch, as the finished stages took with their start-up (or, before one finished, as the running ones
        take so far), shared among as many stages as run at once now."""
        now = self.clock()
        stages = list(self.stages.values())
        per_epoch = [s.elapsed(now) / s.epochs for s in stages if s.status == "finished" and s.ended and s.epochs]
        if not per_epoch:
            per_epoch = [s.elapsed(now) / s.epochs_done for s in stages if s.status == RUNNING and s.epochs_done]
        waiting = [s for s in stages if s.status == WAITING]
        running = [s for s in stages if s.status == RUNNING]
        if not per_epoch and (waiting or running):
            return None
        pace = statistics.fmean(per_epoch) if per_epoch else 0.0
        running_left = [s.left(now) if s.left(now) is not None else pace * s.epochs for s in running]
        queued = sum(pace * s.epochs for s in waiting) / max(len(running), 1)
        return max(running_left, default=0.0) + queued

    # -- rendering ---------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        done = sum(s.status not in (WAITING, RUNNING) for s in self.stages.values())
        running = sum(s.status == RUNNING for s in self.stages.values())
        return {"done": done, "running": running, "waiting": len(self.stages) - done - running}

    def headline(self) -> str:
        now, c = self.clock(), self.counts()
        left = self.left()
        estimate = "" if c["done"] == len(self.stages) else \
            f", ~{duration(left)} left" if left is not None else ", estimate after the first epoch"
        return (f"[pipeline] {self.title}: {c['done']}/{len(self.stages)} done, {c['running']} running, "
                f"{c['waiting']} waiting; {duration(now - self.started)} elapsed{estimate}")

    def stage_line(self, stage: StageState) -> str:
        now = self.clock()
        width = max(len(s.name) for s in self.stages.values())
        parts = [f"  {stage.status:<8} {stage.name:<{width}}"]
        if stage.status == RUNNING:
            parts.append(f"epoch {stage.epochs_done}/{stage.epochs}")
        if stage.started is not None:
            parts.append(duration(stage.elapsed(now)))
        left = stage.left(now)
        if left is not None:
            parts.append(f"~{duration(left)} left")
        if stage.note:
            parts.append(stage.note)
        return "  ".join(parts).rstrip()

    def release(self) -> None:
        """Something else is printed now: the next board starts below it instead of drawing over it."""
        self._drawn = 0

    def lines(self) -> list[str]:
        return [self.headline(), *(self.stage_line(s) for s in self.stages.values())]

    def show(self) -> None:
        """On a terminal: redraw the whole board in place. In a log: one line per stage whose state changed
        (status, epoch), then the headline."""
        if self.tty:
            lines = self.lines()
            up = f"\x1b[{self._drawn}F" if self._drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            self._drawn = len(lines)
            self.stream.flush()
            return
        changed = []
        for stage in self.stages.values():
            state = f"{stage.status}:{stage.epochs_done}"
            if self._last_lines.get(stage.key) != state:
                self._last_lines[stage.key] = state
                if stage.status != WAITING:
                    changed.append(self.stage_line(stage).strip())
        if changed:
            self.stream.write("".join(f"[pipeline] {line}\n" for line in changed) + self.headline() + "\n")
            self.stream.flush()


def poll_running(client, experiment_id: str, since_ms: int, stages: dict[str, StageState]) -> dict[str, dict]:
    """The stages that have a RUNNING run in the tracking store (started since `since_ms`): plan key ->
    {started, epochs_done, epoch_seconds, note}. A sweep's trials count for their sweep's stage; the run the
    trials nest under trains nothing and is not one of them."""
    from orchestrator.pipeline.sweep import TAG_SWEEP
    from orchestrator.tracking.stage_run import STATUS_RUNNING, TAG_STATUS

    runs = client.search_runs([experiment_id], max_results=200,
                              filter_string=f"tags.`{TAG_STATUS}` = '{STATUS_RUNNING}' and "
                                            f"attributes.start_time >= {since_ms}")
    by_name = {s.name: s.key for s in stages.values()}
    found: dict[str, dict] = {}
    runs_of: dict[str, int] = {}
    for run in runs:
        if TAG_SWEEP in run.data.tags:
            continue
        name = run.info.run_name or ""
        key = by_name.get(name) or next((k for n, k in by_name.items() if name.startswith(n + " ")), None)
        if key is None:
            continue
        history = client.get_metric_history(run.info.run_id, EPOCH_TIME)
        entry = {"started": run.info.start_time / 1000.0, "epochs_done": len(history),
                 "epoch_seconds": sum(m.value for m in history),
                 "note": name.removeprefix(stages[key].name).strip()}
        runs_of[key] = runs_of.get(key, 0) + 1
        previous = found.get(key)
        if previous is None:
            found[key] = entry
        else:  # several trials of one sweep: the stage is as far as its slowest trial
            previous["epochs_done"] = min(previous["epochs_done"], entry["epochs_done"])
            previous["started"] = min(previous["started"], entry["started"])
            previous["note"] = f"{runs_of[key]} trials"
    return found

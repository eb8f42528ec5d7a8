"""The whole pipeline, start to end: data, plan, MLflow pipeline run, Ray, the stage DAG, tables, summary.

`pipelines/full_paper.py` only parses its arguments and calls `run_pipeline`. On a cluster (under
`ray job submit`, or with RAY_ADDRESS set) it connects to the existing Ray; otherwise it starts a local
Ray and stops it at the end.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator import atomic
from orchestrator.data.folder import check_data_folder
from orchestrator.pipeline.config import PipelineConfig, dump_pipeline_config
from orchestrator.pipeline.integrity import TAG_WORK_DIR, end_pipeline_runs, end_stale_runs, work_dir_lock
from orchestrator.pipeline.outcome import BLOCKED, FAILED, SKIPPED, StageOutcome, headline_metrics, per_bit_top1
from orchestrator.pipeline.paper_tables import Table, build_tables, render_markdown
from orchestrator.pipeline.plan import Plan, build_plan

TAG_PIPELINE = "bitmixer.pipeline"
TAG_PIPELINE_HASH = "bitmixer.pipeline_hash"
UI_MODEL_TRAINING = "workflowType=machine_learning"  # the MLflow UI's query for its model-training view


@dataclass
class PipelineReport:
    run_id: str
    outcomes: dict[str, StageOutcome]
    tables: list[Table]
    tracking_uri: str
    seconds: float
    experiment_id: str = ""

    @property
    def failed(self) -> list[StageOutcome]:
        return [o for o in self.outcomes.values() if o.status in (FAILED, BLOCKED)]

    def summary(self) -> str:
        width = max(len(k) for k in self.outcomes)
        lines = [f"Pipeline run {self.run_id}: {len(self.outcomes)} stages in {self.seconds:.0f} s "
                 f"({sum(o.status == SKIPPED for o in self.outcomes.values())} found done, "
                 f"{len(self.failed)} failed or blocked)"]
        for key, o in self.outcomes.items():
            why = o.error if o.error else o.detail
            lines.append(f"  {key:<{width}}  {o.status:<8}  {why}")
        return "\n".join(lines)


def prepare_data(cfg: PipelineConfig, work_dir: Path) -> Path:
    """The data folder: the embedded digits written under the work dir, or the configured path."""
    if cfg.data.embedded == "digits":
        from orchestrator.data.embedded import write_embedded_digits
        return Path(write_embedded_digits(work_dir / "data" / "digits"))
    return Path(cfg.data.path)


def table_outcomes(plan: Plan, outcomes: dict[str, StageOutcome]) -> dict[tuple[str, str, str], dict]:
    """Plan outcomes as the tables' (architecture, variant, stage) -> top-1 per bit key; with several seeds
    a figure is the MeanStd over the seeds that finished."""
    from orchestrator.pipeline.paper_tables import over_seeds
    per_seed: dict[tuple[str, str, str], list[dict]] = {}
    for key, outcome in outcomes.items():
        node = plan.nodes[key]
        if outcome.ok and node.stage in ("two", "three", "independent"):
            per_seed.setdefault((node.arch, node.variant, node.stage), []).append(
                per_bit_top1(outcome.metrics, list(node.config.model.bits_activations)))
    return {where: over_seeds(runs) for where, runs in per_seed.items()}


def subnet_figures(plan: Plan, outcomes: dict[str, StageOutcome]) -> dict[str, dict[str, float]]:
    """Architecture -> the Table 6 sub-net figures of its final model (first seed), where the search ran."""
    from orchestrator.pipeline.subnet_table import METRIC_PREFIX
    found = {}
    for key, outcome in outcomes.items():
        node = plan.nodes[key]
        if node.variant == "main" and node.stage == "three" and not node.replica:
            figures = {k: v for k, v in outcome.metrics.items() if k.startswith(METRIC_PREFIX)}
            if figures:
                found[node.arch] = figures
    return found


def _experiment(client, cfg: PipelineConfig, tracking_uri: str, work_dir: Path) -> str:
    """Create the experiment here, in the driver, before any stage or trial races to create it; it opens
    in the MLflow UI's model-training view, with a description."""
    from orchestrator.tracking.stage_run import describe_experiment
    name = cfg.tracking.experiment
    found = client.get_experiment_by_name(name)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        # A sqlite store keeps artifacts next to itself (a server decides for itself: S3 with --serve-artifacts).
        location = (work_dir / "mlartifacts").as_uri() if tracking_uri.startswith("sqlite:") else None
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except Exception:
            experiment_id = client.get_experiment_by_name(name).experiment_id
    architectures = ", ".join(a.name for a in cfg.architectures)
    describe_experiment(client, experiment_id, (
        f"Bit-Mixer pipeline `{cfg.name}` ({architectures}; bits {sorted(cfg.bits.activations)}). The run "
        f"`pipeline-{cfg.name}` holds the paper's tables (its description and tables/) and the headline "
        f"figures `<architecture>/stage3/top1_<b>bit`, `.../stage3/rand`, `.../indep/top1_<b>bit`; its "
        f"nested runs are the stages (Stage I-III, Independent, ablations, the Stage III sweep)."))
    return experiment_id


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The UI address of a run: on the server itself, or on the `mlflow ui` that ui_command starts. MLflow
    3's UI keeps a GenAI / model-training switch of its own beside the experiment's kind; the address picks
    model training."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_MODEL_TRAINING}"


def resolved_config(cfg: PipelineConfig, *, data_path: Path, work_dir: Path, tracking_uri: str) -> dict:
    """The pipeline config as JSON with the paths it actually used instead of their None defaults."""
    resolved = cfg.model_dump(mode="json")
    resolved["work_dir"] = str(work_dir)
    resolved["data"]["path"] = str(data_path)
    resolved["tracking"]["tracking_uri"] = tracking_uri
    resolved["tracking"]["storage_path"] = cfg.resolved_storage_path()
    return resolved


def log_tables(client, run_id: str, tables: list[Table], work_dir: Path) -> None:
    """Each table as log_table JSON (the MLflow UI's table view), Markdown and CSV on the pipeline run,
    and the same files under <work_dir>/tables (orchestrator.atomic: whole files only). The tables' Markdown
    is also the run's description, so Table 7 is on the run's Overview page."""
    client.set_tag(run_id, "mlflow.note.content", render_markdown(tables))
    out = work_dir / "tables"
    out.mkdir(parents=True, exist_ok=True)
    for table in tables:
        client.log_table(run_id, data=table.to_dict(), artifact_file=f"tables/{table.name}.json")
        for suffix, text in (("md", table.to_markdown()), ("csv", table.to_csv())):
            client.log_text(run_id, text, f"tables/{table.name}.{suffix}")
            atomic.write_text(out / f"{table.name}.{suffix}", text)
    client.log_text(run_id, render_markdown(tables), "tables/all_tables.md")


def _connect_ray(env_vars: dict[str, str]) -> bool:
    """Connect to the cluster of the job (or RAY_ADDRESS); else start a local Ray. True if we started it.

    The workers' own output (epoch lines, Ray Train's controller) stays in Ray's log files and out of the
    terminal, where the progress board says what runs; a failed stage's traceback still comes back with
    its outcome."""
    import ray

    from orchestrator.pipeline.ray_output import quiet_expected_raylet_notices
    if ray.is_initialized():
        return False
    quiet_expected_raylet_notices()
    with _keeping_sigterm_handler():
        if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), runtime_env={"env_vars": env_vars},
                     log_to_driver=False)
            return False
        ray.init(runtime_env={"env_vars": env_vars}, include_dashboard=False, log_to_driver=False)
    return True


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """ray.init replaces the driver's SIGTERM handler (and its core worker installs one that ends the process
    without unwinding): put ours back, so that SIGTERM still ends the open runs KILLED and stops Ray."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def run_pipeline(cfg: PipelineConfig, *, log=print, retrain: bool = False) -> PipelineReport:
    """Run everything the config asks for; a failed stage is reported in the summary, not raised. One
    pipeline per work dir at a time (a second raises WorkDirBusy); `retrain` trains every stage again even
    when MLflow holds a FINISHED run of its config."""
    with work_dir_lock(cfg.resolved_work_dir()):
        return _run_pipeline(cfg, log=log, retrain=retrain)


def _run_pipeline(cfg: PipelineConfig, *, log, retrain: bool) -> PipelineReport:
    from mlflow.tracking import MlflowClient

    from orchestrator.data.compile_cache import CACHE_DIR_VARIABLE, compile_cache_dir
    from orchestrator.engine.process_env import local_cpu_run, worker_environment
    from orchestrator.tracking.reachability import check_tracking_reachable
    from orchestrator.tracking.config import TrackingConfig
    from orchestrator.tracking.credentials import (PASSWORD_VARIABLE, USERNAME_VARIABLE, credentials_to_environment,
                                                   redact_text, redact_tree)
    from orchestrator.tracking.stage_run import code_version_tags, flatten

    started = time.monotonic()
    work_dir = cfg.resolved_work_dir()
    work_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = credentials_to_environment(cfg.resolved_tracking_uri())  # user:password@ -> MLflow variables
    check_tracking_reachable(TrackingConfig(tracking_uri=tracking_uri, experiment=cfg.tracking.experiment))
    data_path = prepare_data(cfg, work_dir)
    check_data_folder(data_path, num_classes=cfg.data.num_classes)  # before MLflow runs and Ray: one sentence
    plan = build_plan(cfg, data_path=data_path, tracking_uri=tracking_uri)
    log(f"[pipeline] {cfg.name}: {len(plan.nodes)} stages for {', '.join(a.name for a in cfg.architectures)}; "
        f"work dir {work_dir}; MLflow {tracking_uri}")

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _experiment(client, cfg, tracking_uri, work_dir)
    for stale in end_stale_runs(tracking_uri, experiment_id, work_dir):  # runs of a driver that was killed
        log(f"[pipeline] run {stale} was left RUNNING by a stopped pipeline; marked KILLED")
    resolved = cfg.model_dump(mode="json")
    pipeline_hash = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()
    run = client.create_run(experiment_id, run_name=f"pipeline-{cfg.name}",
                            tags={TAG_PIPELINE: cfg.name, TAG_PIPELINE_HASH: pipeline_hash,
                                  TAG_WORK_DIR: str(work_dir), **code_version_tags()})
    run_id = run.info.run_id
    log(f"[pipeline] run: {run_link(tracking_uri, experiment_id, run_id)}")
    succeeded = stopped = False
    started_ray = False
    try:
        from mlflow.entities import Param
        paths = resolved_config(cfg, data_path=data_path, work_dir=work_dir, tracking_uri=tracking_uri)
        params = [Param(k, v[:6000]) for k, v in sorted(flatten(redact_tree(paths)).items())]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        client.log_text(run_id, redact_text(dump_pipeline_config(cfg)), "config/pipeline.yaml")

        env_vars = {**worker_environment(local_cpu=local_cpu_run(cfg.scaling.use_gpu)),
                    "MLFLOW_TRACKING_URI": tracking_uri,
                    CACHE_DIR_VARIABLE: compile_cache_dir(),  # FFCV's numba code, compiled once per machine
                    "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        # Tracking credentials reach the stage tasks and their workers through the environment only.
        env_vars.update({k: os.environ[k] for k in (USERNAME_VARIABLE, PASSWORD_VARIABLE) if k in os.environ})
        started_ray = _connect_ray(env_vars)
        from orchestrator.pipeline.runner import run_plan
        outcomes = run_plan(plan, cfg, parent_run_id=run_id, env_vars=env_vars, retrain=retrain)

        tables = build_tables(table_outcomes(plan, outcomes), architectures=[a.name for a in cfg.architectures],
                              bit_keys=[str(b) for b in sorted(cfg.bits.activations, reverse=True)],
                              ablation_arch=cfg.ablation_arch.name, ablations=cfg.ablations.model_dump(),
                              main_teacher={"two": cfg.distillation.teacher,
                                            "three": cfg.distillation.stage_three_teacher or cfg.distillation.teacher},
                              subnets=subnet_figures(plan, outcomes))
        log_tables(client, run_id, tables, work_dir)
        report = PipelineReport(run_id=run_id, outcomes=outcomes, tables=tables, tracking_uri=tracking_uri,
                                seconds=time.monotonic() - started, experiment_id=experiment_id)
        client.log_text(run_id, report.summary(), "summary.txt")
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        headline = {**headline_metrics(table_outcomes(plan, outcomes)),
                    "pipeline/stages_failed": len(report.failed),
                    "pipeline/stages_skipped": sum(o.status == SKIPPED for o in outcomes.values()),
                    "sys/pipeline_seconds": report.seconds}
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(headline.items())])
        succeeded = not report.failed
        return report
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM: the pipeline and its open runs end KILLED
        stopped = True
        raise
    finally:
        if started_ray:  # first, so that no stage task is left to write into a run ended below
            import ray
            ray.shutdown()
        end_pipeline_runs(tracking_uri, run_id, "FINISHED" if succeeded else "KILLED" if stopped else "FAILED")


def ui_command(tracking_uri: str, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """How to open the results: a sqlite store needs `mlflow ui`; a server is already a UI. With a run, the
    address goes straight to it."""
    where = run_link(tracking_uri, experiment_id, run_id) if experiment_id and run_id else None
    if tracking_uri.startswith("sqlite:"):
        artifacts = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        return (f"mlflow ui --backend-store-uri {tracking_uri} --default-artifact-root {artifacts.as_uri()} "
                f"--host 127.0.0.1 --port 5000   # then open {where or 'http://127.0.0.1:5000'}")
    return f"open {where or tracking_uri} in a browser"

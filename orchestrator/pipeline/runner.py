"""The stage DAG on Ray: each stage is a driver task whose inputs are its predecessors' outcomes.

For every node of the plan one `@ray.remote(num_cpus=0)` task is submitted with the ObjectRefs of the
stages it starts from (and learns from) as arguments, so Ray starts it when they are done, and chains
that do not depend on each other (other architectures, baselines, ablations) run concurrently as far as
the cluster has room for their Train workers. The driver tasks hold no CPU: they only wait on their
TorchTrainer, whose workers hold the resources.

Nodes that share a Train run (`StageNode.train_run`) are one task with one returned object per node.
A task never raises: a failed stage returns a `failed` outcome with its error, and every stage after it in
the same chain returns `blocked`, naming it, without running; other chains go on. A stage whose config
hash already has a FINISHED run in MLflow is `skipped` and hands on that run's model; an unfinished one
is re-run under the same Ray run name, so Ray Train resumes it from its last checkpoint.
"""
from __future__ import annotations

import os
import traceback

from orchestrator.engine.config import StageConfig, config_hash
from orchestrator.pipeline.config import PipelineConfig
from orchestrator.pipeline.outcome import (BLOCKED, FAILED, FINISHED, StageOutcome, finished_outcome,
                                           model_uri)
from orchestrator.pipeline.plan import Plan, StageNode


def resolve_stage_config(node: StageNode, upstream: dict[str, StageOutcome], parent_run_id: str | None) -> StageConfig:
    """The node's StageConfig with its predecessors' models filled in (what its config hash covers)."""
    update: dict = {"tracking": node.config.tracking.model_copy(update={"parent_run_id": parent_run_id})}
    if node.init_after:
        update["init_from"] = upstream[node.init_after].model_uri
    if node.teacher_after:
        update["distill"] = node.config.distill.model_copy(
            update={"teacher": "path", "teacher_uri": upstream[node.teacher_after].model_uri})
    return node.config.model_copy(update=update)


def execute_node(node: StageNode, upstream: list[StageOutcome], *, parent_run_id: str | None,
                 pipeline: PipelineConfig, retrain: bool = False) -> StageOutcome:
    """Run one node (or find it done, unless `retrain`); never raises."""
    return execute_nodes([node], upstream, parent_run_id=parent_run_id, pipeline=pipeline, retrain=retrain)[0]


def execute_nodes(nodes: list[StageNode], upstream: list[StageOutcome], *, parent_run_id: str | None,
                  pipeline: PipelineConfig, retrain: bool = False) -> list[StageOutcome]:
    """Run the nodes of one Train run (those not found done, unless `retrain`), side by side when there are
    several; their outcomes in order. Never raises: an error fails every node it stopped."""
    by_key = {o.key: o for o in upstream}
    broken = [o for o in upstream if not o.ok]
    if broken:
        first = broken[0]
        cause = first.key if first.status == FAILED else first.error.removeprefix("not run: ").removesuffix(" failed")
        return [StageOutcome(key=node.key, status=BLOCKED, error=f"not run: {cause} failed") for node in nodes]
    outcomes: dict[str, StageOutcome] = {}
    try:
        cfgs = {node.key: resolve_stage_config(node, by_key, parent_run_id) for node in nodes}
        os.environ.setdefault("MLFLOW_TRACKING_URI", nodes[0].config.tracking.tracking_uri)
        to_train = []
        for node in nodes:
            cfg = cfgs[node.key]
            if node.sweep:
                from orchestrator.pipeline.sweep import run_sweep
                outcomes[node.key] = run_sweep(cfg, pipeline.sweep, trial_cpus=pipeline.scaling.trial_cpus,
                                               storage_path=cfg.storage_path, key=node.key,
                                               parent_run_id=parent_run_id, retrain=retrain)
                continue
            found = None if retrain else finished_outcome(node.key, cfg.tracking.tracking_uri,
                                                          cfg.tracking.experiment, config_hash(cfg))
            if found is not None:
                outcomes[node.key] = found
            else:
                to_train.append(node)
        for node, result in zip(to_train, _train([cfgs[node.key] for node in to_train], retrain)):
            resumed = result.metrics.get("resumed_at_epoch", -1)
            outcomes[node.key] = StageOutcome(
                key=node.key, status=FINISHED, run_id=result.mlflow_run_id, model_uri=model_uri(result.mlflow_run_id),
                metrics=result.metrics, config_hash=result.config_hash,
                detail=f"resumed at epoch {resumed}" if resumed is not None and resumed >= 0 else "")
        for node in nodes:
            _after_final_stage(node, cfgs[node.key], outcomes[node.key], pipeline)
        return [outcomes[node.key] for node in nodes]
    except Exception as err:  # the summary reports it; later stages of these chains are blocked
        message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        stopped = [node.key for node in nodes if node.key not in outcomes]
        print(f"[pipeline] stage {', '.join(stopped)} failed:\n{traceback.format_exc()}", flush=True)
        # One traceback in the summary, on the first stage it stopped.
        return [outcomes.get(node.key) or StageOutcome(
            key=node.key, status=FAILED, error=message,
            traceback=traceback.format_exc() if node.key == stopped[0] else "") for node in nodes]


def _train(cfgs: list[StageConfig], retrain: bool) -> list:
    """One Train run for the stages: alone, or side by side."""
    if not cfgs:
        return []
    if len(cfgs) == 1:
        from orchestrator.engine.stage import run_stage
        return [run_stage(cfgs[0], retrain=retrain)]
    from orchestrator.engine.stage import run_stages
    return run_stages(cfgs, retrain=retrain)


def _after_final_stage(node: StageNode, cfg: StageConfig, outcome: StageOutcome, pipeline: PipelineConfig) -> None:
    """For the final model of an architecture (main chain, Stage III, first seed): register it, and add
    Table 6's figures and the analysis plots, unless a re-run finds them there already."""
    if not (node.variant == "main" and node.stage == "three" and not node.replica):
        return
    if pipeline.tracking.register_models:
        from orchestrator.pipeline.outcome import per_bit_top1
        from orchestrator.pipeline.sweep import register_final_model
        name = f"{pipeline.tracking.registered_model_prefix}-{pipeline.name}-{node.arch}"
        version = register_final_model(cfg.tracking.tracking_uri, name, outcome.run_id, architecture=node.arch,
                                       per_bit=per_bit_top1(outcome.metrics, list(cfg.model.bits_activations)))
        outcome.detail = f"{outcome.detail}; registered as {name} v{version}".lstrip("; ")
    if pipeline.tracking.table6 and not any(k.startswith("subnets/") for k in outcome.metrics):
        from orchestrator.pipeline.subnet_table import table6_figures  # once per model: a re-run finds them
        outcome.metrics.update(table6_figures(node.arch, outcome, cfg.data, tracking_uri=cfg.tracking.tracking_uri))
    if pipeline.tracking.analysis_plots:
        from orchestrator.pipeline.analysis import analyse_final_stage
        searched = any(k.startswith("subnets/") for k in outcome.metrics)  # Table 6 drew Fig. 4 and 5
        analyse_final_stage(node.arch, outcome, cfg.data, tracking_uri=cfg.tracking.tracking_uri,
                            eigenvalues=pipeline.tracking.analysis_eigenvalues and not searched)


def run_plan(plan: Plan, pipeline: PipelineConfig, *, parent_run_id: str | None,
             env_vars: dict[str, str] | None = None, retrain: bool = False) -> dict[str, StageOutcome]:
    """Submit every node as a Ray task wired to its predecessors; wait for all; return their outcomes."""
    import ray

    @ray.remote(num_cpus=0, max_retries=0)
    def stage_task(nodes: list[StageNode], *upstream: StageOutcome):
        outcomes = execute_nodes(nodes, list(upstream), parent_run_id=parent_run_id, pipeline=pipeline,
                                 retrain=retrain)
        return outcomes[0] if len(outcomes) == 1 else tuple(outcomes)  # one object per node

    options = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    refs = {}
    for nodes in plan.train_runs():
        deps = list(dict.fromkeys(k for node in nodes for k in plan.upstream(node)))
        task = stage_task.options(name=f"stage:{'+'.join(node.key for node in nodes)}", num_returns=len(nodes),
                                  **options).remote(nodes, *[refs[k] for k in deps])
        for node, ref in zip(nodes, [task] if len(nodes) == 1 else task):
            refs[node.key] = ref
    outcomes: dict[str, StageOutcome] = {}
    pending = {ref: key for key, ref in refs.items()}
    watch = _ProgressWatch(plan, pipeline.name)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_POLL_S)
        if not done:
            watch.poll()
            continue
        key = pending.pop(done[0])
        try:
            outcome = ray.get(done[0])
        except Exception as err:  # the task itself died (its node was lost, ...)
            outcome = StageOutcome(key=key, status=FAILED, error=f"{type(err).__name__}: {err}".splitlines()[0])
        outcomes[key] = outcome
        watch.ended(key, outcome)
    return {key: outcomes[key] for key in refs}


PROGRESS_POLL_S = 5.0  # how often the driver reads the running stages' epochs from the tracking store


class _ProgressWatch:
    """The progress board of a running plan, fed by the tracking store; a tracking error only pauses it."""

    def __init__(self, plan: Plan, title: str):
        import time

        from orchestrator.pipeline.progress import ProgressBoard
        self.board = ProgressBoard.for_plan(plan, title)
        self.since_ms = int(time.time() * 1000) - 60_000  # a little slack for clocks between machines
        first = next(iter(plan.nodes.values()))
        self.tracking = first.config.tracking

    def poll(self) -> None:
        from mlflow.tracking import MlflowClient

        from orchestrator.pipeline.progress import poll_running
        try:
            client = MlflowClient(tracking_uri=self.tracking.tracking_uri)
            experiment = client.get_experiment_by_name(self.tracking.experiment)
            if experiment is not None:
                for key, state in poll_running(client, experiment.experiment_id, self.since_ms,
                                               self.board.stages).items():
                    self.board.running(key, **state)
        except Exception as err:  # the report is a by-product: the stages go on
            print(f"[pipeline] progress not read from MLflow: {type(err).__name__}", flush=True)
        self.board.show()

    def ended(self, key: str, outcome: StageOutcome) -> None:
        if outcome.traceback:
            self.board.release()
            print(f"[pipeline] stage {key} failed:\n{outcome.traceback}", flush=True)
        note = outcome.error if outcome.error else outcome.detail
        self.board.ended(key, outcome.status, note or "")
        self.board.show()

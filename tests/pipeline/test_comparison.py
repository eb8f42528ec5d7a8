"""What a researcher compares in the MLflow UI: the pipeline run's headline figures named architecture /
stage / bit-width, flat params with the paths actually used, and a direct link to the run."""
from __future__ import annotations

from pathlib import Path

from orchestrator.pipeline.app import resolved_config, run_link, ui_command
from orchestrator.pipeline.config import load_pipeline_config
from orchestrator.pipeline.outcome import headline_metrics
from orchestrator.tracking.stage_run import flatten

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def test_headline_metrics_are_named_by_architecture_stage_and_bits():
    """Stage II/III figures per bit and Rand., each Independent network at its own bit-width only, and an
    ablation under its variant's name."""
    per_bit = {("resnet18", "main", "two"): {"4": 69.0, "2": 65.0},
               ("resnet18", "main", "three"): {"4": 68.0, "2": 64.0, "rand": 66.0},
               ("resnet18", "independent_4", "independent"): {"4": 70.0, "2": 10.0},
               ("resnet18", "no_transitional_bn", "three"): {"rand": 9.0}}
    assert headline_metrics(per_bit) == {
        "resnet18/stage2/top1_4bit": 69.0, "resnet18/stage2/top1_2bit": 65.0,
        "resnet18/stage3/top1_4bit": 68.0, "resnet18/stage3/top1_2bit": 64.0, "resnet18/stage3/rand": 66.0,
        "resnet18/indep/top1_4bit": 70.0, "resnet18/no_transitional_bn/stage3/rand": 9.0}


def test_params_are_flat_keys_with_resolved_paths(tmp_path):
    """The pipeline run's params: one key per setting (architectures.0.name, not a 1,400-character dict),
    and data.path / work_dir / tracking_uri as used, never None."""
    cfg = load_pipeline_config(CONFIGS / "embedded.yaml")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = flatten(resolved_config(cfg, data_path=tmp_path / "digits", work_dir=tmp_path, tracking_uri=uri))
    assert params["architectures.0.name"] == "resnet_tiny" and params["architectures.1.name"] == "ebn_tiny"
    assert params["architectures.0.stages.three.k"] == "0.75"
    assert not any(k == "architectures" for k in params)
    assert params["data.path"] == str(tmp_path / "digits") and params["work_dir"] == str(tmp_path)
    assert params["tracking.tracking_uri"] == uri and params["tracking.storage_path"] != "None"
    assert all(len(v) < 500 for v in params.values()), max(params.values(), key=len)


def test_the_pipeline_links_straight_to_its_run():
    """On a server the link is the server's own run page; a sqlite store's link is the `mlflow ui` it names."""
    view = "?workflowType=machine_learning"  # the UI's model-training view, not its GenAI one
    assert run_link("http://127.0.0.1:5000/", "3", "abc") == f"http://127.0.0.1:5000/#/experiments/3/runs/abc{view}"
    assert f"open http://h:1/#/experiments/3/runs/abc{view}" in ui_command("http://h:1", "3", "abc")
    assert ui_command("sqlite:////tmp/m.db", "3", "abc").endswith(f"open http://127.0.0.1:5000/#/experiments/3/runs/abc{view}")


def test_registered_version_has_a_description_and_per_bit_tags(tmp_path):
    """The registry entry of a final model says what it is and carries its top-1 per bit-width as tags."""
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline.sweep import register_final_model
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(exp).info.run_id
    version = register_final_model(uri, "bitmixer-r", run_id, architecture="resnet_tiny",
                                   per_bit={"4": 91.04, "2": 85.0, "rand": 88.0})
    mv = client.get_model_version("bitmixer-r", version)
    assert mv.tags == {"top1_4bit": "91.0", "top1_2bit": "85.0", "rand": "88.0", "architecture": "resnet_tiny"}
    assert "resnet_tiny" in mv.description and "4 bits 91.0" in mv.description and "Rand. 88.0" in mv.description
    assert register_final_model(uri, "bitmixer-r", run_id) == version  # once per run


def test_run_names_are_short_distinct_and_start_with_the_stage():
    """Every stage run of the embedded plan has its own name, stage first, then architecture and what
    differs; a sweep trial adds only its swept values."""
    from orchestrator.pipeline.plan import build_plan
    from orchestrator.pipeline.sweep import trial_config
    plan = build_plan(load_pipeline_config(CONFIGS / "embedded.yaml"), data_path="/d", tracking_uri="sqlite:////tmp/x.db")
    names = {key: node.config.tracking.run_name for key, node in plan.nodes.items()}
    assert len(set(names.values())) == len(names)
    assert names["resnet_tiny/main/three"] == "stage3 resnet_tiny"
    assert names["resnet_tiny/independent_4/independent"] == "indep resnet_tiny 4bit"
    assert names["resnet_tiny/no_transitional_bn/three"] == "stage3 resnet_tiny no_transitional_bn"
    assert all(len(n) <= 40 for n in names.values()), names
    trial = trial_config(plan.nodes["ebn_tiny/main/three"].config, 0.6667, 1, "linear", "sweep")
    assert trial.tracking.run_name == "stage3 ebn_tiny k0.667 ramp1 linear"


def _evaluations(epochs: int, every: int) -> int:
    """How many epochs a stage evaluates: every `every`-th one and always the last (the worker's rule)."""
    return sum(1 for epoch in range(epochs) if epoch == epochs - 1 or (epoch + 1) % every == 0)


def test_every_preset_evaluates_often_enough_for_per_bit_curves():
    """Every stage of every preset evaluates at two epochs or more, so its val/top1_<b>bit chart is a
    curve, not a single dot."""
    from orchestrator.pipeline.plan import build_plan
    for path in sorted(CONFIGS.glob("*.yaml")):
        plan = build_plan(load_pipeline_config(path), data_path="/d", tracking_uri="sqlite:////tmp/x.db")
        for key, node in plan.nodes.items():
            cfg = node.config
            assert _evaluations(cfg.optim.epochs, cfg.eval_every_epochs) >= 2, (path.name, key)


def test_every_preset_draws_fig4_of_each_final_model():
    """Fig. 4 (top-1 against average bits and BitOPs) comes from the sub-net search of Table 6, or of the
    analysis plots when Table 6 is off: every preset has one of them on."""
    for path in sorted(CONFIGS.glob("*.yaml")):
        tracking = load_pipeline_config(path).tracking
        assert tracking.table6 or (tracking.analysis_plots and tracking.analysis_eigenvalues), path.name


def _plan_config(key: str, tracking_uri: str):
    from orchestrator.pipeline.plan import build_plan
    plan = build_plan(load_pipeline_config(CONFIGS / "embedded.yaml"), data_path="/d", tracking_uri=tracking_uri)
    return plan.nodes[key].config


def test_independent_runs_are_tagged_independent(tmp_path, monkeypatch):
    """The stage run run_stage opens for an Independent network says so: stage tag `independent` (never
    `fixed`) and the bit-width it trained at."""
    from mlflow.tracking import MlflowClient

    import orchestrator.engine.stage as stage
    from orchestrator.tracking.stage_run import TAG_INDEPENDENT_BITS, TAG_STAGE

    class StopBeforeRay(RuntimeError):
        pass

    def stop(cfg):
        raise StopBeforeRay
    monkeypatch.setattr(stage, "check_data_folder", lambda *args, **kwargs: None)
    monkeypatch.setattr(stage, "_ensure_ray", stop)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _plan_config("resnet_tiny/independent_4/independent", uri)
    try:
        stage.run_stage(cfg)
    except StopBeforeRay:
        pass
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.run_name == "indep resnet_tiny 4bit"
    assert run.data.tags[TAG_STAGE] == "independent" and run.data.tags[TAG_INDEPENDENT_BITS] == "4"


def test_sweep_parent_is_tagged_with_stage_and_architecture(tmp_path):
    """The run a Stage III sweep's trials nest under carries the stage and architecture tags (so it filters
    with the stage runs), nests under the pipeline run, and a re-submission finds the same one."""
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline.sweep import TAG_SWEEP, _sweep_run
    from orchestrator.tracking.stage_run import TAG_ARCHITECTURE, TAG_STAGE, experiment_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = _plan_config("ebn_tiny/main/three", uri)
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(experiment_id(uri, base.tracking.experiment), run_name="pipeline-embedded").info.run_id
    sweep = _sweep_run(base, parent, "sweep-key")
    tags = client.get_run(sweep).data.tags
    assert tags[TAG_STAGE] == "three" and tags[TAG_ARCHITECTURE] == "ebn_tiny" and tags[TAG_SWEEP] == "sweep-key"
    assert tags["mlflow.parentRunId"] == parent
    assert client.get_run(sweep).info.run_name == "stage3 ebn_tiny sweep"
    assert _sweep_run(base, parent, "sweep-key") == sweep


def test_experiment_opens_in_the_model_training_view_with_a_description(tmp_path):
    """The MLflow UI opens an experiment in its GenAI view unless the experiment's kind says otherwise: the
    pipeline's experiment, and one a stage creates on its own, are tagged for model training; the
    pipeline's also says what it holds."""
    from mlflow.tracking import MlflowClient

    from orchestrator.pipeline.app import _experiment
    from orchestrator.tracking.stage_run import experiment_id

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    cfg = load_pipeline_config(CONFIGS / "embedded.yaml")
    tags = client.get_experiment(_experiment(client, cfg, uri, tmp_path)).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "Bit-Mixer pipeline `embedded`" in tags["mlflow.note.content"]
    assert "<architecture>/stage3/top1_<b>bit" in tags["mlflow.note.content"]  # where to compare
    alone = client.get_experiment(experiment_id(uri, "a-stage-on-its-own")).tags
    assert alone["mlflow.experimentKind"] == "custom_model_development"


def test_the_pipeline_prints_the_link_to_its_run_first(tmp_path, monkeypatch):
    """Before any stage starts, the pipeline prints the address of its own run in the model-training view
    (data preparation and Ray are replaced here; the stages fail at once)."""
    from mlflow.tracking import MlflowClient

    import orchestrator.pipeline.runner as runner
    from orchestrator.pipeline import app

    class NoStages(RuntimeError):
        pass

    def no_stages(*args, **kwargs):
        raise NoStages("the stages are not run by this test")
    monkeypatch.setattr(app, "prepare_data", lambda cfg, work_dir: work_dir / "digits")
    monkeypatch.setattr(app, "check_data_folder", lambda *args, **kwargs: None)
    monkeypatch.setattr(app, "_connect_ray", lambda env_vars: False)
    monkeypatch.setattr(runner, "run_plan", no_stages)
    cfg = load_pipeline_config(CONFIGS / "embedded.yaml")
    cfg.work_dir = str(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg.tracking.tracking_uri = uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the pipeline sets it for its stages; restored afterwards
    lines = []
    try:
        app.run_pipeline(cfg, log=lines.append)
    except NoStages:
        pass
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    (run,) = client.search_runs([experiment], filter_string="tags.`bitmixer.pipeline` = 'embedded'")
    link = f"[pipeline] run: {run_link(uri, experiment, run.info.run_id)}"
    assert link in lines and "workflowType=machine_learning" in link

"""The Ray trainer a stage runs under: Ray's TorchTrainer less its Ray Datasets helper (no DatasetManager
actor per run, since a stage reads its data with FFCV), every other callback of Ray's kept."""


def test_stage_trainer_leaves_out_only_the_datasets_callback():
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback

    from orchestrator.engine.stage import stage_trainer_class

    def callbacks(trainer_class):
        trainer = trainer_class(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(c) for c in trainer._create_default_callbacks()]
    ray_default, stage = callbacks(TorchTrainer), callbacks(stage_trainer_class())
    assert DatasetsCallback in ray_default  # what the stage trainer leaves out exists in this Ray
    assert stage == [c for c in ray_default if c is not DatasetsCallback]

"""The pipeline config: every preset loads, and a bad key or value is refused with its path in the file
before anything starts."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.pipeline.config import PipelineConfigError, load_pipeline_config, parse_pipeline_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def _embedded() -> dict:
    return yaml.safe_load((CONFIGS / "embedded.yaml").read_text())


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(preset):
    """Every YAML under pipelines/configs/ must be a valid pipeline config (a preset that fails to
    load would only be found when someone launches it on a cluster)."""
    cfg = load_pipeline_config(preset)
    assert cfg.architectures and cfg.name == preset.stem


def test_imagenet_preset_is_the_paper_recipe():
    """imagenet.yaml must hold section 5.1's recipe and all six architectures of Table 7."""
    cfg = load_pipeline_config(CONFIGS / "imagenet.yaml")
    assert [a.name for a in cfg.architectures] == ["resnet18", "resnet34", "resnet50", "ebn_4_8_8_16",
                                                   "ebn_4_8_16_32", "ebn_4_4_4_4"]
    for arch in cfg.architectures:
        for stage in (arch.stages.one, arch.stages.two, arch.stages.three):
            assert (stage.epochs, stage.warmup_epochs, stage.lr_peak, stage.weight_decay) == (160, 10, 1e-3, 1e-4)
    assert (cfg.data.train_resolution, cfg.data.val_resolution) == (224, 224)
    assert cfg.data.val_crop_ratio == pytest.approx(224 / 256)


def test_ablation_presets_switch_on_their_table():
    """Each ablation preset extends imagenet.yaml and switches on exactly its table's ablation."""
    expected = {"table1_no_tbn": "no_transitional_bn", "table2_distillation": "teachers",
                "table3_bits_4321": "bits_4321", "table4_ternary_binary": "ternary_binary",
                "table5_quantizers": "quantizers"}
    for name, switch in expected.items():
        cfg = load_pipeline_config(CONFIGS / f"{name}.yaml")
        on = [k for k, v in cfg.ablations.model_dump().items() if v is True]
        assert on == [switch], name
        assert cfg.architectures[0].stages.one.epochs == 160  # inherited from imagenet.yaml


def test_fidelity_preset_runs_every_claim_long_enough_over_several_seeds():
    """fidelity.yaml is what bench/fidelity.py checks the paper's claims on: at least 3 seeds (mean ± std),
    stages far longer than the 3-epoch default, and every chain a claim reads (the Independent 2-bit network,
    Table 1 without Transitional BN, Table 3's bits {1, 2, 3, 4})."""
    cfg = load_pipeline_config(CONFIGS / "fidelity.yaml")
    assert len(set(cfg.seeds or [])) >= 3
    for arch in cfg.architectures:
        assert all(stage.epochs >= 10 for stage in (arch.stages.one, arch.stages.two, arch.stages.three))
    assert cfg.baselines.independent.enabled and 2 in cfg.baselines.independent.bits
    assert cfg.ablations.no_transitional_bn and cfg.ablations.bits_4321
    assert (cfg.bits.weights, cfg.bits.activations) == ([2, 3, 4], [2, 3, 4])


def test_misspelt_key_is_named_with_its_path(tmp_path):
    """A misspelt stage setting must be rejected, naming the architecture and stage it sits in."""
    raw = _embedded()
    raw["architectures"][0]["stages"] = {"two": {"epohcs": 3}}
    with pytest.raises(PipelineConfigError) as err:
        parse_pipeline_config(raw, "my.yaml")
    assert "architectures[0].stages.two.epohcs: is not a known setting" in str(err.value)
    assert "my.yaml" in str(err.value)


def test_bad_value_is_named_with_its_path_and_value():
    """A value out of range must be rejected with its path and the value given."""
    raw = _embedded()
    raw["architectures"][1]["stages"] = {"two": {"epochs": 0}}
    with pytest.raises(PipelineConfigError, match=r"architectures\[1\]\.stages\.two\.epochs: .*greater than 0 "
                                                  r"\(got 0\)"):
        parse_pipeline_config(raw)


def test_stage_defaults_merge_into_each_architecture():
    """The top-level `stages` is every architecture's default; an architecture overrides single keys
    and keeps the rest of the default."""
    raw = _embedded()
    raw["architectures"][1]["stages"] = {"three": {"epochs": 7}}
    cfg = parse_pipeline_config(raw)
    assert cfg.architectures[1].stages.three.epochs == 7
    assert cfg.architectures[1].stages.three.ramp_epochs == raw["stages"]["three"]["ramp_epochs"]
    assert cfg.architectures[0].stages.three.epochs == raw["stages"]["three"]["epochs"]


@pytest.mark.parametrize("change, message", [
    (lambda r: r["architectures"].append({"name": "resnet_tiny"}), "each architecture may appear once"),
    (lambda r: r["architectures"].__setitem__(0, {"name": "resnet19"}), "unknown architecture 'resnet19'"),
    (lambda r: r.__setitem__("distillation", {"teacher": "fp32"}), "enable stage zero"),
    (lambda r: r["sweep"].__setitem__("k", [1.5]), "k=1.5 is not a probability"),
    (lambda r: r["stages"].__setitem__("two", {"enabled": False}), "stages must run without gaps"),
    (lambda r: r["data"].__setitem__("path", "/data"), "give exactly one of data.path"),
    (lambda r: r["ablations"].__setitem__("architecture", "resnet50"), "not among the architectures"),
    (lambda r: r["bits"].__setitem__("weights", [1, 3]), "must list as many bit-widths"),
])
def test_inconsistent_configs_say_what_to_fix(change, message):
    """Cross-field mistakes (a teacher that is never trained, a gap in the stage chain, an ablation on
    an architecture that does not run, ...) are refused with a sentence that says what to change."""
    raw = _embedded()
    change(raw)
    with pytest.raises(PipelineConfigError, match=message):
        parse_pipeline_config(raw)


def test_missing_file_and_bad_yaml(tmp_path):
    """A missing file or broken YAML gets one sentence naming the file, not a traceback from yaml."""
    with pytest.raises(PipelineConfigError, match="does not exist"):
        load_pipeline_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(PipelineConfigError, match="is not valid YAML"):
        load_pipeline_config(bad)
    cyclic = tmp_path / "cyclic.yaml"
    cyclic.write_text("extends: cyclic.yaml\n")
    with pytest.raises(PipelineConfigError, match="extends itself"):
        load_pipeline_config(cyclic)

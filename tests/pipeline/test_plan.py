"""The plan: which stages run, what each starts from and learns from, and which engine settings they get."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.pipeline.config import PipelineConfigError, load_pipeline_config, parse_pipeline_config
from orchestrator.pipeline.plan import build_plan

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"


def _plan(name: str):
    return build_plan(load_pipeline_config(CONFIGS / f"{name}.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")


def test_embedded_plan_chains_each_architecture():
    """Each architecture runs I -> II -> III (III swept), the Independent networks start from Stage I at one
    fixed bit-width for as long as Stage II, and the Table 1 ablation has its own chain with one shared BN."""
    plan = _plan("embedded")
    for arch in ("resnet_tiny", "ebn_tiny"):
        one, two, three = (plan.nodes[f"{arch}/main/{s}"] for s in ("one", "two", "three"))
        assert (one.init_after, two.init_after, three.init_after) == (None, one.key, two.key)
        assert [n.config.policy.stage for n in (one, two, three)] == ["one", "two", "three"]
        assert three.sweep and not two.sweep
    for b in (4, 3, 2):
        node = plan.nodes[f"resnet_tiny/independent_{b}/independent"]
        assert node.init_after == "resnet_tiny/main/one"
        assert (node.config.policy.stage, node.config.policy.fixed_bits) == ("independent", b)
        assert node.stage == "independent"  # labelled as the Independent baseline, not as a Stage II
        assert node.config.optim.epochs == plan.nodes["resnet_tiny/main/two"].config.optim.epochs
    assert "ebn_tiny/independent_4/independent" not in plan.nodes  # the preset limits it to resnet_tiny
    # Table 1's "w/o Transitional BN" is Stage III started from the main chain's Stage II model (section 4.1),
    # with one BN per bit-width of the current layer.
    no_tbn = [n for n in plan.nodes.values() if n.variant == "no_transitional_bn"]
    assert [n.stage for n in no_tbn] == ["three"] and no_tbn[0].init_after == "resnet_tiny/main/two"
    assert no_tbn[0].config.model.bn == "per_bit" and not no_tbn[0].sweep
    assert plan.nodes["resnet_tiny/main/one"].config.model.bn == "transitional"


def test_imagenet_preset_distils_stage_two_from_stage_one_and_stage_three_from_fp32():
    """Table 2's best rows are the recipe: Stage II learns from the Stage I network, Stage III from FP32."""
    plan = _plan("imagenet")
    for arch in ("resnet18", "ebn_4_4_4_4"):
        assert plan.nodes[f"{arch}/main/two"].teacher_after == f"{arch}/main/one"
        assert plan.nodes[f"{arch}/main/three"].teacher_after == f"{arch}/main/fp32"
        assert plan.nodes[f"{arch}/main/one"].teacher_after is None


def test_fp32_teacher_wiring_and_table2_variants():
    """Table 2 runs every teacher for both stages: the main chain (Stage I teacher for II, FP32 for III)
    stands for its own rows, and chains branching from main's Stage I stand for the others."""
    plan = _plan("table2_distillation")
    assert plan.nodes["resnet18/main/fp32"].config.policy.stage == "fp32"
    assert plan.nodes["resnet18/main/one"].teacher_after is None
    assert plan.nodes["resnet18/main/two"].teacher_after == "resnet18/main/one"
    assert plan.nodes["resnet18/main/three"].teacher_after == "resnet18/main/fp32"
    for stage in ("two", "three"):
        assert plan.nodes[f"resnet18/teacher_none/{stage}"].teacher_after is None
        assert plan.nodes[f"resnet18/teacher_stage_one/{stage}"].teacher_after == "resnet18/main/one"
        assert plan.nodes[f"resnet18/teacher_fp32/{stage}"].teacher_after == "resnet18/main/fp32"
        assert plan.nodes[f"resnet18/main/{stage}"].config.distill.teacher == "path"
    assert plan.nodes["resnet18/teacher_none/two"].init_after == "resnet18/main/one"
    assert plan.nodes["resnet18/teacher_none/two"].config.distill.teacher == "none"


def test_bit_set_ablations_build_their_own_networks():
    """Table 3's chain uses bits {1,2,3,4} through Stage II only and its 1-bit Independent network starts from
    that chain; Table 4 pairs activations {2,3,4} with weights {1,3,4}; Table 5 changes the quantizer."""
    plan = _plan("table3_bits_4321")
    assert [n.stage for n in plan.nodes.values() if n.variant == "bits_4321"] == ["one", "two"]
    assert plan.nodes["resnet18/bits_4321/one"].config.model.bits_activations == [1, 2, 3, 4]
    assert plan.nodes["resnet18/independent_1/independent"].init_after == "resnet18/bits_4321/one"
    model = _plan("table4_ternary_binary").nodes["resnet18/ternary_binary/three"].config.model
    assert (model.bits_weights, model.bits_activations) == ([1, 3, 4], [2, 3, 4])
    t5 = _plan("table5_quantizers").nodes
    assert (t5["resnet18/asymmetric/two"].config.model.symmetric, t5["resnet18/asymmetric/two"].config.model.rounding) == (False, "floor")
    assert (t5["resnet18/asymmetric_round/two"].config.model.symmetric, t5["resnet18/asymmetric_round/two"].config.model.rounding) == (False, "round")


def test_engine_refusal_is_reported_before_anything_runs():
    """A combination the engine's StageConfig refuses (a global batch that does not split over the
    workers) must be a PipelineConfigError at plan time, saying what must hold."""
    raw = yaml.safe_load((CONFIGS / "embedded.yaml").read_text())
    raw["data"]["batch_size"] = 127
    with pytest.raises(PipelineConfigError, match="must be divisible by scaling.num_workers"):
        build_plan(parse_pipeline_config(raw), data_path="/data", tracking_uri="sqlite:////tmp/x.db")


def test_seeds_repeat_every_chain_under_its_own_seed():
    """`seeds: [0, 1, 2]`: each stage runs once per seed, every copy starting from and learning from its own
    seed's models; only the first seed's final model is registered and analysed (replica False)."""
    raw = yaml.safe_load((CONFIGS / "embedded.yaml").read_text())
    raw["seeds"] = [0, 1, 2]
    plan = build_plan(parse_pipeline_config(raw, "seeds.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")
    base = [k for k in plan.nodes if "@" not in k]
    assert len(plan.nodes) == 3 * len(base)
    two = plan.nodes["resnet_tiny/main/two@seed2"]
    assert two.init_after == "resnet_tiny/main/one@seed2" and two.config.seed == 2 and two.replica
    assert plan.nodes["resnet_tiny/main/two"].config.seed == 0 and not plan.nodes["resnet_tiny/main/two"].replica
    assert two.config.name.endswith("-seed2") and two.config.tracking.run_name.endswith("seed2")
    names = [n.config.name for n in plan.nodes.values()]
    assert len(set(names)) == len(names)  # distinct Ray run names and MLflow runs
    raw["seeds"] = [1, 1]
    with pytest.raises(PipelineConfigError, match="each seed may appear once"):
        parse_pipeline_config(raw, "seeds.yaml")


def test_table_figures_are_aggregated_over_the_seeds_that_finished():
    """table_outcomes merges the seeds of one (architecture, variant, stage) into mean ± std."""
    from orchestrator.pipeline.app import table_outcomes
    from orchestrator.pipeline.outcome import FAILED, FINISHED, StageOutcome
    raw = yaml.safe_load((CONFIGS / "embedded.yaml").read_text())
    raw["seeds"] = [0, 1, 2]
    plan = build_plan(parse_pipeline_config(raw, "seeds.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")
    outcomes = {key: StageOutcome(key=key, status=FINISHED, metrics={"val/top1_2bit": 10.0 * (i + 1)})
                for i, key in enumerate(["resnet_tiny/main/two", "resnet_tiny/main/two@seed1"])}
    outcomes["resnet_tiny/main/two@seed2"] = StageOutcome(key="resnet_tiny/main/two@seed2", status=FAILED)
    merged = table_outcomes(plan, outcomes)[("resnet_tiny", "main", "two")]["2"]
    assert (merged.mean, round(merged.std, 6), merged.n) == (15.0, round(50 ** 0.5, 6), 2)
    # The Independent networks reach the tables under their own stage (Table 7's Independent column).
    outcomes["resnet_tiny/independent_2/independent"] = StageOutcome(
        key="resnet_tiny/independent_2/independent", status=FINISHED, metrics={"val/top1_2bit": 42.0})
    indep = table_outcomes(plan, outcomes)[("resnet_tiny", "independent_2", "independent")]["2"]
    assert float(indep) == 42.0


@pytest.mark.parametrize("preset", ["embedded", "imagenet", "table1_no_tbn", "table3_bits_4321"])
def test_every_node_names_its_stage_by_the_cores_stage_key(preset):
    """One notion of stage: a node's stage is a key of bitmixer_core.STAGES and the same as its engine
    policy's (no pipeline vocabulary such as "zero" beside it, no Independent network called "two")."""
    from bitmixer_core import STAGES
    for node in _plan(preset).nodes.values():
        assert node.stage in STAGES and node.stage == node.config.policy.stage, node.key


def test_table1_preset_starts_without_transitional_bn_from_the_main_stage_two_model():
    """table1_no_tbn.yaml: "w/o Transitional BN" is Stage III only, started from the main chain's Stage II
    model (section 4.1), with one BN per bit-width and the main chain's teacher."""
    plan = _plan("table1_no_tbn")
    no_tbn = [n for n in plan.nodes.values() if n.variant == "no_transitional_bn"]
    assert [n.key for n in no_tbn] == ["resnet18/no_transitional_bn/three"]
    assert no_tbn[0].init_after == "resnet18/main/two" and no_tbn[0].config.model.bn == "per_bit"
    assert no_tbn[0].teacher_after == plan.nodes["resnet18/main/three"].teacher_after


@pytest.mark.parametrize("preset", ["imagenet", "table1_no_tbn", "table2_distillation", "table3_bits_4321",
                                    "table4_ternary_binary", "table5_quantizers", "fidelity"])
def test_smoke_keeps_the_presets_whole_dag(preset):
    """`full_paper.py --smoke` shrinks sizes only: the same stages, what each starts from and learns from,
    its policy and its model options (bits, BN mode, quantizer, block order) as the preset (first seed)."""
    from orchestrator.pipeline.smoke import smoke_config

    def shape(cfg):
        plan = build_plan(cfg, data_path="/data", tracking_uri="sqlite:////tmp/x.db")
        return {n.key: (n.stage, n.init_after, n.teacher_after, n.sweep, n.config.policy.stage,
                        n.config.policy.fixed_bits, n.config.distill.teacher,
                        n.config.model.model_dump(exclude={"stem", "num_classes"}))
                for n in plan.nodes.values() if not n.replica}

    cfg = load_pipeline_config(CONFIGS / f"{preset}.yaml")
    assert shape(smoke_config(cfg)) == shape(cfg)


def test_independent_networks_share_one_train_run_when_asked():
    """`one_train_run: true` (the embedded preset): an architecture's Independent networks that start from
    the same Stage I form one Train run, per seed; a 1-bit network starting from the 4-3-2-1 chain's Stage I
    gets its own; `false` leaves every node a Train run of its own."""
    raw = yaml.safe_load((CONFIGS / "embedded.yaml").read_text())
    raw["seeds"] = [0, 1]
    raw["scaling"]["pack_architectures"] = False  # the main chain's stages alone (the test below packs them)
    runs = [[n.key for n in members] for members in
            build_plan(parse_pipeline_config(raw, "e.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db").train_runs()]
    shared = [keys for keys in runs if len(keys) > 1]
    assert shared == [[f"resnet_tiny/independent_{b}/independent" for b in (4, 3, 2)],
                      [f"resnet_tiny/independent_{b}/independent@seed1" for b in (4, 3, 2)]]
    assert sum(len(keys) for keys in runs) == 2 * 10  # every node once
    raw["baselines"]["independent"]["one_train_run"] = False
    plan = build_plan(parse_pipeline_config(raw, "e.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")
    assert all(len(members) == 1 for members in plan.train_runs())
    table3 = load_pipeline_config(CONFIGS / "table3_bits_4321.yaml")
    table3.baselines.independent.one_train_run = True
    runs = build_plan(table3, data_path="/data", tracking_uri="sqlite:////tmp/x.db").train_runs()
    independent = [[n.variant for n in members] for members in runs if members[0].stage == "independent"]
    assert independent == [["independent_4", "independent_3", "independent_2"], ["independent_1"]]



def test_pack_architectures_puts_each_main_stage_of_every_architecture_in_one_train_run():
    """`scaling.pack_architectures`: Stage I of both architectures in one Train run, Stage II likewise; a
    Tune sweep (Stage III) and the ablation stay alone; an architecture whose Stage I is longer (its own
    override) cannot share the others' run and gets its own."""
    raw = yaml.safe_load((CONFIGS / "embedded.yaml").read_text())
    assert raw["scaling"]["pack_architectures"]  # the default run packs them
    plan = build_plan(parse_pipeline_config(raw, "e.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")
    runs = [[n.key for n in members] for members in plan.train_runs()]
    assert ["resnet_tiny/main/one", "ebn_tiny/main/one"] in runs
    assert ["resnet_tiny/main/two", "ebn_tiny/main/two"] in runs
    assert ["resnet_tiny/main/three"] in runs and ["ebn_tiny/main/three"] in runs
    assert ["resnet_tiny/no_transitional_bn/three"] in runs
    raw["architectures"][1]["stages"] = {"one": {"epochs": 5}}
    plan = build_plan(parse_pipeline_config(raw, "e.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")
    runs = [[n.key for n in members] for members in plan.train_runs()]
    assert ["resnet_tiny/main/one"] in runs and ["ebn_tiny/main/one"] in runs


def test_compile_blocks_reaches_every_stage_and_is_refused_with_the_bn_first_order():
    """`scaling.compile_blocks: true` turns the engine's compiled regions on in every stage of the plan;
    with an architecture in the BN-first block order the engine's refusal is a PipelineConfigError at plan
    time, before Ray starts."""
    raw = yaml.safe_load((CONFIGS / "embedded.yaml").read_text())
    assert not any(n.config.deepspeed.compile_blocks for n in _plan("embedded").nodes.values())
    raw["scaling"]["compile_blocks"] = True
    plan = build_plan(parse_pipeline_config(raw, "e.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")
    assert all(n.config.deepspeed.compile_blocks for n in plan.nodes.values())
    raw["architectures"][0]["block_order"] = "bn_quantize_conv"
    with pytest.raises(PipelineConfigError, match="compile_blocks"):
        build_plan(parse_pipeline_config(raw, "e.yaml"), data_path="/data", tracking_uri="sqlite:////tmp/x.db")

"""Pure logic of the engine: stage config validation, config hash, LR schedule, DeepSpeed config, sub-net
seeding. No Ray, no DeepSpeed engine."""
import math

import pytest
import torch
from pydantic import ValidationError

from orchestrator.engine.config import StageConfig, config_hash
from orchestrator.engine.deepspeed_config import deepspeed_config
from orchestrator.engine.schedule import lr_at, warmup_cosine
from orchestrator.engine.subnets import SubnetSampler, step_seed


def stage_dict(**overrides) -> dict:
    base = dict(
        name="s1",
        model=dict(name="resnet_tiny", num_classes=10, stem="small"),
        data=dict(path="/nonexistent/data", batch_size=64, num_workers=1),
        optim=dict(epochs=4, warmup_epochs=1),
        policy=dict(stage="one"),
        tracking=dict(tracking_uri="sqlite:////tmp/x.db"),
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def error_text(**overrides) -> str:
    with pytest.raises(ValidationError) as info:
        StageConfig.model_validate(stage_dict(**overrides))
    return str(info.value)


def test_unknown_key_is_rejected_by_name():
    """A typo in a preset must fail before Ray starts, naming the misspelt field."""
    text = error_text(optim=dict(lr_peek=0.1))
    assert "lr_peek" in text and "Extra inputs are not permitted" in text


def test_bad_values_name_their_field():
    """Out-of-range or wrong-choice values name the field that holds them."""
    assert "policy.stage" in error_text(policy=dict(stage="four")).replace("\n", ".")
    assert "zero_stage" in error_text(deepspeed=dict(zero_stage=3))
    assert "policy.k\n" in error_text(policy=dict(stage="three", k=1.5))
    assert "model.name\n" in error_text(model=dict(name="resnet19"))
    assert "unknown architecture 'resnet19'" in error_text(model=dict(name="resnet19"))


def test_cross_field_rules_say_what_to_do():
    """Rules spanning fields give one sentence naming both fields."""
    assert "policy.fixed_bits is required" in error_text(policy=dict(stage="independent"))
    assert "policy.fixed_bits (5) is not one of model.bits_activations" in error_text(
        policy=dict(stage="independent", fixed_bits=5))
    assert "divisible by scaling.num_workers" in error_text(data=dict(batch_size=63))
    assert "distill.teacher_uri is required" in error_text(distill=dict(teacher="path"))
    assert "must list as many bit-widths" in error_text(model=dict(bits_weights=[1, 3], bits_activations=[2, 3, 4]))
    assert "warmup_epochs" in error_text(optim=dict(epochs=4, warmup_epochs=4))
    assert "tracking_uri" in error_text(tracking=dict(tracking_uri="localhost:5000"))
    assert "compile_blocks compiles the classic block order only" in error_text(
        model=dict(block_order="bn_quantize_conv"), deepspeed=dict(compile_blocks=True))


def test_config_hash_tracks_what_is_trained_only():
    """The hash changes with anything that changes training, and not with where it is tracked or stored."""
    a = StageConfig.model_validate(stage_dict())
    same = StageConfig.model_validate(stage_dict(storage_path="s3://elsewhere", tracking=dict(
        tracking_uri="http://127.0.0.1:1")))
    other = StageConfig.model_validate(stage_dict(optim=dict(lr_peak=2e-3)))
    compiled = StageConfig.model_validate(stage_dict(deepspeed=dict(compile_blocks=True)))  # how, not what
    assert config_hash(a) == config_hash(same) == config_hash(compiled)
    assert config_hash(a) != config_hash(other)
    assert len(config_hash(a)) == 64


def test_lr_warmup_then_cosine():
    """Linear warm-up to the peak over warmup_steps, then a cosine that reaches lr_final at the last step."""
    total, warm, peak = 100, 10, 1e-3
    lrs = [lr_at(s, total_steps=total, warmup_steps=warm, lr_peak=peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm)
    assert lrs[warm - 1] == pytest.approx(peak)
    assert all(b > a for a, b in zip(lrs[:warm - 1], lrs[1:warm]))  # rising during warm-up
    assert all(b <= a for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # never rising afterwards
    middle = warm + (total - 1 - warm) / 2
    assert lr_at(int(middle), total_steps=total, warmup_steps=warm, lr_peak=peak) == pytest.approx(
        peak * 0.5 * (1 + math.cos(math.pi * int(middle - warm) / (total - 1 - warm))))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_lambda_lr_steps_the_optimizer_per_iteration():
    """The scheduler handed to DeepSpeed sets the optimizer's lr to lr_at(step) after each step."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=123.0)
    sched = warmup_cosine(opt, total_steps=20, warmup_steps=4, lr_peak=1e-3)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, total_steps=20, warmup_steps=4, lr_peak=1e-3) for s in range(20)])


def test_deepspeed_config_from_ours():
    """Global batch split over workers and accumulation; torch Adam with L2 decay (never FusedAdam); fp32
    on CPU, bf16 autocast only on GPU (never DeepSpeed's bf16 weights); ZeRO stage from the config."""
    cfg = StageConfig.model_validate(stage_dict(data=dict(batch_size=256), scaling=dict(num_workers=4),
                                                deepspeed=dict(grad_accumulation=2, zero_stage=2)))
    ds = deepspeed_config(cfg, world_size=4, use_gpu=False)
    assert ds["train_batch_size"] == 256
    assert ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 2
    # No clipping: ZeRO skips the global gradient norm (nothing else reads it); ZeRO 0 has no such key.
    assert ds["zero_optimization"] == {"stage": 2, "compute_grad_norm": False}
    clipping = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"gradient_clipping": 1.0})})
    assert deepspeed_config(clipping, world_size=4, use_gpu=False)["zero_optimization"] == {"stage": 2}
    assert ds["gradient_clipping"] == 0.0  # written even when off: DeepSpeed's default is 1.0
    zero = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": 0})})
    assert deepspeed_config(zero, world_size=4, use_gpu=False)["zero_optimization"] == {"stage": 0}
    opt = ds["optimizer"]
    assert opt["type"] == "Adam" and opt["params"]["torch_adam"] is True and opt["params"]["adam_w_mode"] is False
    assert opt["params"]["lr"] == 1e-3 and opt["params"]["weight_decay"] == 1e-4
    assert ds["bf16"]["enabled"] is False and ds["torch_autocast"]["enabled"] is False
    on_gpu = deepspeed_config(cfg, world_size=4, use_gpu=True)
    assert on_gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and on_gpu["bf16"]["enabled"] is False
    no_bf16 = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"bf16_on_gpu": False})})
    assert deepspeed_config(no_bf16, world_size=4, use_gpu=True)["torch_autocast"]["enabled"] is False


def test_subnet_draws_depend_only_on_seed_and_step():
    """Two samplers (two ranks) with the same run seed draw the same sub-net at every step, whatever order
    the steps come in (a resumed rank starts mid-way); a different run seed draws differently."""
    cfg = StageConfig.model_validate(stage_dict(policy=dict(stage="three", k=0.75, ramp_epochs=0)))
    a = SubnetSampler(cfg.model.build(), cfg.policy, cfg.model, run_seed=7)
    b = SubnetSampler(cfg.model.build(), cfg.policy, cfg.model, run_seed=7)
    c = SubnetSampler(cfg.model.build(), cfg.policy, cfg.model, run_seed=8)
    steps = list(range(50))
    draws_a = [a.draw(s, 1.0).bits for s in steps]
    draws_b = [b.draw(s, 1.0).bits for s in reversed(steps)][::-1]
    assert draws_a == draws_b
    assert draws_a != [c.draw(s, 1.0).bits for s in steps]
    assert len({bits for bits in draws_a}) > 10  # Stage III at k=0.75: mostly layer-wise, varied draws
    assert step_seed(0, 1) != step_seed(1, 0)


def test_the_policy_accepts_exactly_the_cores_stages():
    """The engine names stages by the core's Stage keys, nothing else (one notion of stage)."""
    import typing

    from bitmixer_core import STAGES
    from orchestrator.engine.config import PolicyConfig
    assert set(typing.get_args(PolicyConfig.model_fields["stage"].annotation)) == set(STAGES)


def test_learned_step_sizes_get_no_weight_decay():
    """The optimizer groups: every (log) step size, and nothing else, in a group with weight decay 0; decay
    would pull log alpha towards 0 (alpha towards 1) whatever the data says."""
    from bitmixer_core import build_model, step_size_parameters
    from orchestrator.engine.deepspeed_config import parameter_groups
    net = build_model("resnet_tiny", num_classes=10, stem="small", first_last="int8")
    others, steps = parameter_groups(net)
    assert "weight_decay" not in others and steps["weight_decay"] == 0.0
    assert {id(p) for p in steps["params"]} == {id(p) for p in step_size_parameters(net)}
    assert len(others["params"]) + len(steps["params"]) == len(list(net.parameters()))


def test_only_stages_that_can_share_a_train_run_train_side_by_side():
    """Stages in one Train run share its workers, loaders, epochs and checkpoint storage, and each needs a
    folder of its own: a stage of another length, another batch, or a repeated name is refused, naming
    what differs; another stage kind, bit-width or teacher is fine."""
    from orchestrator.engine.config import check_side_by_side
    two = StageConfig.model_validate(stage_dict(name="two"))
    independent = StageConfig.model_validate(stage_dict(name="indep", policy={"stage": "independent", "fixed_bits": 2}))
    check_side_by_side([two, independent])
    with pytest.raises(ValueError, match="differ in optim.epochs"):
        check_side_by_side([two, StageConfig.model_validate(stage_dict(name="x", optim={"epochs": 7}))])
    with pytest.raises(ValueError, match="differ in data"):
        check_side_by_side([two, StageConfig.model_validate(stage_dict(name="x", data={"path": "/d", "batch_size": 64}))])
    with pytest.raises(ValueError, match="distinct names"):
        check_side_by_side([two, two])

"""The bf16 engine, for real: a DeepSpeed engine built from our config for a GPU stage autocasts its forward
to bf16 while its weights, gradients, optimizer and BN statistics stay float32 (DeepSpeed's own "bf16" mode
casts the weights, and a bf16 running average stalls). It runs on CPU here: autocast and ZeRO-1 behave the
same, only slower. A fresh process, since DeepSpeed's process group lives as long as its process."""
from __future__ import annotations

from tests.engine.engine_process import run_engine_script

TRAIN_IN_BF16 = """
import bitmixer_core as core
from orchestrator.engine.config import StageConfig
from orchestrator.engine.deepspeed_config import deepspeed_config, parameter_groups
from orchestrator.engine.step import train_step
from orchestrator.engine.subnets import SubnetSampler, set_stage_precision
from orchestrator.engine.evaluation import evaluate_stage

cfg = StageConfig.model_validate(dict(
    name="bf16", model=dict(name="resnet_tiny", num_classes=10, stem="small"),
    data=dict(path="/unused", batch_size=16), optim=dict(epochs=1, warmup_epochs=0),
    policy=dict(stage="three", k=0.75, ramp_epochs=0), scaling=dict(num_workers=1, use_gpu=True),
    tracking=dict(tracking_uri="sqlite:////tmp/unused.db")))
torch.manual_seed(0)
net = cfg.model.build()
set_stage_precision(net, "three")
images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
core.calibrate_activation_step_sizes(net, images)
engine, *_ = deepspeed.initialize(model=net, model_parameters=parameter_groups(net),
                                  config=deepspeed_config(cfg, world_size=1, use_gpu=True), dist_init_required=False)
conv_outputs = set()
engine.module.layer1[0].conv1.register_forward_hook(lambda m, a, out: conv_outputs.add(str(out.dtype)))
running_var = {n: b.clone() for n, b in engine.module.named_buffers() if n.endswith("running_var")}
sampler = SubnetSampler(engine.module, cfg.policy, cfg.model, run_seed=0)
losses = [train_step(engine, images, labels, sampler=sampler, global_step=s, epoch=1.0, accumulation=1,
                     distill=cfg.distill, dtype=torch.bfloat16) for s in range(3)]
moved = sum(not torch.equal(b, running_var[n]) for n, b in engine.module.named_buffers() if n in running_var)
metrics = evaluate_stage(engine.module, [(images, labels)], stage="three", bits=[2, 4], rand_seeds=[0],
                         device=torch.device("cpu"), dtype=torch.bfloat16)
print(json.dumps({
    "losses_finite": all(torch.isfinite(torch.tensor(s / n)).item() for s, n in losses),
    "conv_outputs": sorted(conv_outputs),
    "parameters": sorted({str(p.dtype) for p in engine.module.parameters()}),
    "buffers": sorted({str(b.dtype) for b in engine.module.buffers() if b.is_floating_point()}),
    "running_vars_moved": moved,
    "optimizer_state": sorted({str(v.dtype) for s in engine.optimizer.optimizer.state.values()
                               for v in s.values() if torch.is_tensor(v) and v.dim() > 0}),
    "evaluated": sorted(metrics)}))
"""


def test_a_gpu_stage_autocasts_to_bf16_and_keeps_float32_weights_and_statistics():
    seen = run_engine_script(TRAIN_IN_BF16, port=29561)
    assert seen["losses_finite"]
    assert seen["conv_outputs"] == ["torch.bfloat16"]  # the forward ran in bf16 (training and evaluation)
    assert seen["parameters"] == ["torch.float32"]
    assert seen["buffers"] == ["torch.float32"]
    assert seen["optimizer_state"] == ["torch.float32"]
    assert seen["running_vars_moved"] > 0
    assert "val/top1_2bit" in seen["evaluated"] and "val/rand_top1_mean" in seen["evaluated"]

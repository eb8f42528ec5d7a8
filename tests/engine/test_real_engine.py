"""Real DeepSpeed engines (ZeRO-1, gloo, CPU accelerator), both built in one fresh process (DeepSpeed's process
group lives as long as its process; one process for both checks saves a start-up):

- The bf16 engine: built from our config for a GPU stage, it autocasts its forward to bf16 while its weights,
  gradients, optimizer and BN statistics stay float32 (DeepSpeed's own "bf16" mode casts the weights, and a bf16
  running average stalls). Autocast and ZeRO-1 behave on CPU as on GPU, only slower.
- gradient_clipping 0 is no clipping (DeepSpeed's own default is 1.0), and without clipping the engine skips
  ZeRO's global gradient norm; with it, the norm is there.
- Transitional BN keeps its entries as rows of stacked tensors; it used to keep one BatchNorm2d per entry.
  The two layouts train identically: DeepSpeed gives a zero gradient to every entry a step did not use, so
  Adam moves those entries (momentum, L2 decay) in both layouts alike.
"""
from __future__ import annotations

import pytest

from tests.engine.engine_process import run_engine_script
from tests.servers import free_port

TRAIN_IN_BF16 = """
import bitmixer_core as core
from orchestrator.engine.config import StageConfig
from orchestrator.engine.deepspeed_config import deepspeed_config, parameter_groups
from orchestrator.engine.step import train_step
from orchestrator.engine.subnets import SubnetSampler, set_stage_precision
from orchestrator.engine.evaluation import evaluate_stage
from orchestrator.engine.precision import compute_dtype

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
config = deepspeed_config(cfg, world_size=1, use_gpu=True)
dtype = compute_dtype(config)  # bf16: a GPU stage's config
engine, *_ = deepspeed.initialize(model=net, model_parameters=parameter_groups(net), config=config,
                                  dist_init_required=False)
conv_outputs = set()
engine.module.layer1[0].conv1.register_forward_hook(lambda m, a, out: conv_outputs.add(str(out.dtype)))
running_var = {n: b.clone() for n, b in engine.module.named_buffers() if n.endswith("running_var")}
sampler = SubnetSampler(engine.module, cfg.policy, cfg.model, run_seed=0)
losses = [train_step(engine, images, labels, sampler=sampler, global_step=s, epoch=1.0, accumulation=1,
                     distill=cfg.distill, dtype=dtype) for s in range(3)]
moved = sum(not torch.equal(b, running_var[n]) for n, b in engine.module.named_buffers() if n in running_var)
metrics = evaluate_stage(engine.module, [(images, labels)], stage="three", bits=[2, 4], rand_seeds=[0],
                         device=torch.device("cpu"), dtype=dtype)
RESULTS["bf16"] = ({
    "losses_finite": all(torch.isfinite(torch.tensor(s / n)).item() for s, n in losses),
    "conv_outputs": sorted(conv_outputs),
    "parameters": sorted({str(p.dtype) for p in engine.module.parameters()}),
    "buffers": sorted({str(b.dtype) for b in engine.module.buffers() if b.is_floating_point()}),
    "running_vars_moved": moved,
    "optimizer_state": sorted({str(v.dtype) for s in engine.optimizer.optimizer.state.values()
                               for v in s.values() if torch.is_tensor(v) and v.dim() > 0}),
    "evaluated": sorted(metrics)})
"""

TRAIN_BOTH_LAYOUTS = """
from torch import nn
import torch.nn.functional as F
from bitmixer_core import TransitionalBatchNorm2d
from orchestrator.engine.config import StageConfig
from orchestrator.engine.deepspeed_config import deepspeed_config, parameter_groups


class OneModulePerEntry(nn.Module):
    def __init__(self, channels, keys):
        super().__init__()
        self.keys = keys
        self.entries = nn.ModuleList(nn.BatchNorm2d(channels) for _ in keys)
        self.active = 0

    def set_transition(self, i, j):
        self.active = self.keys.index((i, j))

    def forward(self, x):
        return self.entries[self.active](x)


class Toy(nn.Module):
    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.fc = nn.Conv2d(3, 4, 3, padding=1, bias=False), norm, nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).mean((2, 3)))


cfg = StageConfig.model_validate(dict(
    name="layouts", model=dict(name="resnet_tiny", num_classes=10, stem="small"),
    data=dict(path="/unused", batch_size=8), optim=dict(epochs=1, warmup_epochs=0, lr_peak=0.01, weight_decay=1e-4),
    policy=dict(stage="three"), tracking=dict(tracking_uri="sqlite:////tmp/unused.db")))
stacked = TransitionalBatchNorm2d(4, (2, 3, 4))
nets = {"stacked": Toy(stacked), "former": Toy(OneModulePerEntry(4, stacked.entry_keys))}
engines = {name: deepspeed.initialize(model=net, model_parameters=parameter_groups(net),
                                      config=deepspeed_config(cfg, world_size=1, use_gpu=False),
                                      dist_init_required=False)[0] for name, net in nets.items()}
draw = torch.Generator().manual_seed(1)
used, differences = set(), []
for step in range(8):
    i, j = stacked.entry_keys[int(torch.randint(len(stacked.entry_keys), (1,), generator=draw))]
    used.add((i, j))
    images, labels = torch.randn(8, 3, 6, 6, generator=draw), torch.randint(0, 10, (8,), generator=draw)
    for engine in engines.values():
        engine.module.norm.set_transition(i, j)
        engine.backward(F.cross_entropy(engine(images), labels))
        engine.step()
    former = nets["former"].norm.entries
    for k in range(len(stacked)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            a, b = getattr(stacked, name)[k], getattr(former[k], name)
            differences.append(float((a - b).abs().max()))
unused = [k for k, key in enumerate(stacked.entry_keys) if key not in used]
RESULTS["layouts"] = {"max_difference": max(differences), "unused_entries": len(unused),
                      "unused_gamma_moved": bool(unused) and bool((stacked.weight[unused] != 1).all())}
"""

# After TRAIN_BOTH_LAYOUTS (its Toy network and cfg): the global gradient norm, with and without clipping.
GRADIENT_NORM = """
norms = {}
for clipping in (0.0, 0.5):
    clipped = cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"gradient_clipping": clipping})})
    net = Toy(TransitionalBatchNorm2d(4, (2, 3, 4)))
    engine = deepspeed.initialize(model=net, model_parameters=parameter_groups(net),
                                  config=deepspeed_config(clipped, world_size=1, use_gpu=False),
                                  dist_init_required=False)[0]
    engine.backward(F.cross_entropy(engine(torch.randn(8, 3, 6, 6)), torch.randint(0, 10, (8,))))
    engine.step()
    norm = engine.get_global_grad_norm()
    norms[str(clipping)] = {"norm": None if norm is None else float(norm), "clips_at": engine.gradient_clipping()}
RESULTS["gradient_norm"] = norms
"""


@pytest.fixture(scope="module")
def engine_runs() -> dict:
    return run_engine_script("RESULTS = {}\n" + TRAIN_IN_BF16 + TRAIN_BOTH_LAYOUTS + GRADIENT_NORM
                             + "print(json.dumps(RESULTS))\n", port=free_port())


def test_a_gpu_stage_autocasts_to_bf16_and_keeps_float32_weights_and_statistics(engine_runs):
    seen = engine_runs["bf16"]
    assert seen["losses_finite"]
    assert seen["conv_outputs"] == ["torch.bfloat16"]  # the forward ran in bf16 (training and evaluation)
    assert seen["parameters"] == ["torch.float32"]
    assert seen["buffers"] == ["torch.float32"]
    assert seen["optimizer_state"] == ["torch.float32"]
    assert seen["running_vars_moved"] > 0
    assert "val/top1_2bit" in seen["evaluated"] and "val/rand_top1_mean" in seen["evaluated"]


def test_stacked_entries_train_exactly_as_one_batchnorm_per_entry_did(engine_runs):
    seen = engine_runs["layouts"]
    # Adam is element-wise and both layouts see the same gradients: the same float operations per element.
    # The entries sit at other offsets of the flat buffer (230 floats) in the two layouts, but at offsets
    # 108-179 in both, inside the SIMD loop's full vectors (the partial last vector starts at 224 with AVX2
    # and with AVX-512 alike), so each goes through the same vectorised code in both: equal to the bit.
    assert seen["max_difference"] == 0.0
    # Some entries were never chosen, and they still moved (DeepSpeed's zero gradient under L2 decay), in both.
    assert seen["unused_entries"] > 0 and seen["unused_gamma_moved"]


def test_a_stage_clips_gradients_only_when_its_config_says_so(engine_runs):
    """gradient_clipping 0 (the default, the paper's recipe) is no clipping in the engine: DeepSpeed clips at 1.0
    when its config leaves the key out. Without clipping, ZeRO-1 also skips the global gradient norm it would
    compute every step (a norm per parameter tensor and an all-reduce, launches a GPU step waits on); a stage
    that clips still gets its norm."""
    off, on = engine_runs["gradient_norm"]["0.0"], engine_runs["gradient_norm"]["0.5"]
    assert off == {"norm": None, "clips_at": 0.0}
    assert on["clips_at"] == 0.5 and on["norm"] is not None and on["norm"] > 0

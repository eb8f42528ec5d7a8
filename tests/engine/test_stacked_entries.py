"""Transitional BN keeps its entries as rows of stacked tensors; it used to keep one BatchNorm2d per entry.
Through a ZeRO-1 DeepSpeed engine the two layouts train identically: DeepSpeed gives a zero gradient to every
entry a step did not use, so Adam moves those entries (momentum, L2 decay) in both layouts alike."""
from __future__ import annotations

from tests.engine.engine_process import run_engine_script

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
print(json.dumps({"max_difference": max(differences), "unused_entries": len(unused),
                  "unused_gamma_moved": bool(unused) and bool((stacked.weight[unused] != 1).all())}))
"""


def test_stacked_entries_train_exactly_as_one_batchnorm_per_entry_did():
    seen = run_engine_script(TRAIN_BOTH_LAYOUTS, port=29562)
    # Adam is element-wise and both layouts see the same gradients: the same float operations per element.
    assert seen["max_difference"] == 0.0
    # Some entries were never chosen, and they still moved (DeepSpeed's zero gradient under L2 decay), in both.
    assert seen["unused_entries"] > 0 and seen["unused_gamma_moved"]

"""The workers' environment: the allocator settings keep a training step's large buffers mapped from one
step to the next (counted as minor page faults of a real process, not timed), a user's own value wins,
and gloo binds to loopback only for a local CPU run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from pathlib import Path

from orchestrator.engine.process_env import ALLOCATOR_VARIABLES, worker_environment

ROOT = Path(__file__).resolve().parents[2]

# Training steps of a Stage III-sized network (ResNet-18, batch 32 at 32x32: activations of 8 MiB), counting
# the minor page faults of three steps after two warm-up steps.
STEPS = """
import json, resource, torch, torch.nn.functional as F
from bitmixer_core import build_model
torch.set_num_threads(1)
torch.manual_seed(0)
net = build_model("resnet18", num_classes=10, stem="small")
images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
def step():
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(net(images), labels).backward()
    optimizer.step()
for _ in range(2):
    step()  # the warm-up maps what the later steps reuse (one step is not always enough)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3))
"""


def _faults_per_step(env: dict[str, str]) -> float:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", STEPS], env={**clean, **env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_allocator_settings_stop_steps_from_faulting_their_buffers_back_in():
    # glibc's starting thresholds (128 KiB), held fixed: its defaults adapt them while a process runs, so
    # whether a default process faults varies from run to run; held, every step returns its freed
    # activations to the kernel and faults them back in (one 8 MiB activation alone is 2,048 pages).
    default = _faults_per_step({"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"})
    kept = _faults_per_step(ALLOCATOR_VARIABLES)
    assert default > 2048
    # Kept in the heap, a later step reuses the pages the warm-up mapped.
    assert kept < default / 10


def test_worker_environment_sets_the_allocator_and_respects_a_users_value(monkeypatch):
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert {k: worker_environment(local_cpu=False)[k] for k in ALLOCATOR_VARIABLES} == ALLOCATOR_VARIABLES
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert worker_environment(local_cpu=False)["MALLOC_TRIM_THRESHOLD_"] == "0"


def test_gloo_binds_to_loopback_only_for_a_local_cpu_run(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert worker_environment(local_cpu=True)["GLOO_SOCKET_IFNAME"] == "lo"
    assert "GLOO_SOCKET_IFNAME" not in worker_environment(local_cpu=False)


def test_a_local_run_goes_without_ray_trains_preemption_watcher_and_a_cluster_keeps_it(monkeypatch):
    """The variable is the one Ray Train's controller reads (and passes on): a renamed one would silently
    start the watcher again."""
    from ray.train.v2._internal import constants
    from orchestrator.engine.process_env import LOCAL_RUN_VARIABLES
    name = constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR
    assert LOCAL_RUN_VARIABLES == {name: "0"} and name in constants.ENV_VARS_TO_PROPAGATE
    monkeypatch.delenv(name, raising=False)
    assert worker_environment(local_cpu=True)[name] == "0"
    assert name not in worker_environment(local_cpu=False)
    monkeypatch.setenv(name, "1")  # a user's own value wins
    assert worker_environment(local_cpu=True)[name] == "1"

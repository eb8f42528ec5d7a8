"""The environment a stage's Ray workers start with: variables that are read once, when a process starts
(by glibc's allocator, gloo or torch's extension loader), so they must reach the workers through Ray's
runtime environment rather than be set from inside them."""
from __future__ import annotations

import os

from orchestrator.engine.build_cache import torch_extensions_dir

# glibc hands blocks of 128 KiB and more back to the kernel on free and trims the top of its heap; a
# training step frees and re-allocates the same activation-sized tensors every step, so every step faulted
# them back in (a ResNet-18 step at batch 32 on CPU: up to 41 k minor page faults as glibc's thresholds
# adapt, under 1 k with these settings; 6-7 % of a step's CPU, plain or Stage III alike). Serving every block up to glibc's 32 MiB maximum from the heap,
# and never trimming it, keeps those pages mapped from one step to the next; the price is that a worker
# keeps its peak heap.
ALLOCATOR_VARIABLES = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(16 * 2**30)}

# Ray Train starts a PreemptionWatcher actor beside every worker group: a process of its own (2.3-3.3
# CPU-seconds a Train run on the 2-core machine, most of it starting Python and Ray) that polls Ray every
# 5 s for a node being drained (a spot instance taken back). A run on this machine alone has no node to
# drain, so it goes without; a cluster keeps it. Ray Train reads the variable in its controller, which
# inherits it from the job's runtime environment (and from the process that builds the TorchTrainer).
LOCAL_RUN_VARIABLES = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_cpu_run(use_gpu: bool) -> bool:
    """A CPU run on this machine alone: no GPU, and no cluster to join (RAY_ADDRESS, or a submitted job)."""
    return not use_gpu and not (os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"))


def worker_environment(*, local_cpu: bool) -> dict[str, str]:
    """Variables for the runtime environment of the Ray job that runs stages. A value the user already set
    wins. `local_cpu`: gloo on this machine alone, so it binds to the loopback interface, and Ray Train's
    helpers that only a cluster uses stay off (LOCAL_RUN_VARIABLES)."""
    env = {"TORCH_EXTENSIONS_DIR": torch_extensions_dir(),
           **{name: os.environ.get(name, value) for name, value in ALLOCATOR_VARIABLES.items()}}
    if local_cpu:
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
        env.update({name: os.environ.get(name, value) for name, value in LOCAL_RUN_VARIABLES.items()})
    return env

"""Where one worker's start-up goes: the CPU seconds (and wall seconds) of each step a Ray Train worker takes
before and during a stage of the default pipeline, measured in one fresh process (world size 1, gloo).

Every stage of `pipelines/full_paper.py` starts two such workers; on the 2-core machine their start-up,
not their 3 epochs, is most of a stage (README, "Where the time goes"). Each reading runs in a fresh
process, since what is cached (numba's compiled loader code, DeepSpeed's op) only matters to a process
that has compiled nothing yet. Ray's own processes (worker start, the Train controller and its helper
actors) are not in this figure: the pipeline's per-process CPU totals are.

    python bench/stage_startup.py                       # with FFCV's compile cache (the default)
    python bench/stage_startup.py --no-compile-cache    # as every worker did before the cache
    python bench/stage_startup.py --profile-engine      # also: what calibration + deepspeed.initialize call
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _steps(data: str, compile_cache: bool, profile_engine: bool = False) -> list[tuple[str, float, float]]:
    """One worker's steps in this process: (step, wall s, CPU s)."""
    marks = [("start", time.perf_counter(), time.process_time())]

    def mark(step: str) -> None:
        marks.append((step, time.perf_counter(), time.process_time()))

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist
    mark("import torch")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from orchestrator.engine.build_cache import torch_extensions_dir, use_environment_build_tools
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    use_environment_build_tools()
    import deepspeed  # noqa: F401
    mark("import deepspeed")
    if compile_cache:  # before FFCV is imported, as `orchestrator.data.loaders` does in a worker
        from orchestrator.data.compile_cache import enable_compile_cache
        enable_compile_cache()
    import ffcv  # noqa: F401
    mark("import ffcv (numba's typed dict: compiled at import, or loaded from the cache)")
    from orchestrator.data.loaders import build_loaders
    from orchestrator.engine.config import StageConfig
    from orchestrator.engine.worker import StageWorker
    cfg = StageConfig.model_validate(dict(
        name="startup", model=dict(name="resnet_tiny", num_classes=10, stem="small", first_last="fp32"),
        data=dict(path=data, train_resolution=32, val_resolution=32, val_crop_ratio=1.0, batch_size=16,
                  num_workers=1, train_crop_scale=[0.35, 1.0]),
        optim=dict(epochs=2, warmup_epochs=1), policy=dict(stage="two"),
        scaling=dict(num_workers=1, cpus_per_worker=0.5),
        tracking=dict(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/mlflow.db", experiment="startup"),
        storage_path=tempfile.mkdtemp()))
    worker = StageWorker(cfg, run_id=None, rank=0, world_size=1)
    net = worker.prepare_model()
    mark("build the network")
    train, val = build_loaders(cfg.data, rank=0, world_size=1, device=torch.device("cpu"), distributed=False)
    mark("build the FFCV loaders")
    next(iter(train))
    mark("first training batch (compiles the loader's pipeline)")
    next(iter(val))
    mark("first validation batch (compiles its pipeline)")
    if profile_engine:  # its callees by cumulative time, to stderr (stdout carries the readings)
        import cProfile
        import pstats
        profile = cProfile.Profile()
        profile.runcall(worker.build_engine, net, (train, val))
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    else:
        worker.build_engine(net, (train, val))
    mark("calibration + deepspeed.initialize (loads the shm-comm op)")
    for epoch in range(cfg.optim.epochs):
        metrics = worker.train_epoch(epoch)
        mark(f"epoch {epoch} (90 steps of 16 images; a 2-worker rank does 45)")
        worker.evaluate(epoch, metrics)
        mark(f"evaluation {epoch} (3 bit-widths + 3 Rand. seeds)")
    return [(step, w1 - w0, c1 - c0) for (_, w0, c0), (step, w1, c1) in zip(marks, marks[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-compile-cache", action="store_true", help="FFCV's numba code compiled in the process")
    parser.add_argument("--data", help="a data folder (default: the embedded digits, written to a temp folder)")
    parser.add_argument("--profile-engine", action="store_true",
                        help="print cProfile's top 25 callees of calibration + deepspeed.initialize (timed under it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_steps(args.data, not args.no_compile_cache, args.profile_engine)))
        return
    data = args.data
    if data is None:
        sys.path.insert(0, str(REPO))
        from orchestrator.data.embedded import write_embedded_digits
        data = str(write_embedded_digits(Path(tempfile.mkdtemp()) / "digits"))
    command = [sys.executable, __file__, "--child", "--data", data] + (["--no-compile-cache"] * args.no_compile_cache)
    subprocess.run(command, check=True, capture_output=True)  # a first process fills the caches
    done = subprocess.run(command + ["--profile-engine"] * args.profile_engine, check=True, capture_output=True,
                          text=True)  # the reading: a later worker
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    if args.profile_engine:
        print(done.stderr[done.stderr.find("function calls"):], "\n")
    print(f"One worker's steps, {'without' if args.no_compile_cache else 'with'} FFCV's compile cache "
          f"(load average {os.getloadavg()[0]:.1f}):\n")
    print("| step | CPU s | wall s |\n|---|---|---|")
    for step, wall, cpu in steps:
        print(f"| {step} | {cpu:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()

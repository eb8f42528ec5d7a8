"""Where the CPU of one whole stage goes, process by process: a real Ray Train run (2 DeepSpeed workers,
FFCV on the embedded digits, an `mlflow server`), its driver in a session of its own, every process of that
session sampled from /proc until the stage ends, then summed by what the process is (Ray's process title:
the Train controller, each helper actor, the workers, Ray's own daemons).

`bench/stage_startup.py` splits one worker's steps; this is the rest of a stage's price, which the default
pipeline pays once per Train run. Each setting in --env runs as its own stage, in the same bench, so the
rows compare on the same machine at the same time. The driver starts with the variables the pipeline gives
its stage tasks on a local run (`worker_environment(local_cpu=True)` of the code it runs). --baseline runs
the same stage from another checkout of the code too (`git archive <commit> | tar -x -C DIR`), interleaved.

    python bench/stage_cpu.py                                   # the defaults
    python bench/stage_cpu.py --env RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=1 --repeats 2
    python bench/stage_cpu.py --baseline /tmp/before --repeats 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def _session_processes(sid: int) -> dict[int, tuple[str, float]]:
    """pid -> (what it is, CPU seconds so far) for every live process of session `sid`."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) != sid:  # field 6 of stat: the session id
            continue
        found[int(entry.name)] = (_kind(cmdline), (int(fields[11]) + int(fields[12])) / TICK)
    return found


def _kind(cmdline: str) -> str:
    """A process's role from its title: Ray names actors and tasks 'ray::Class.method'."""
    title = re.match(r"ray::([\w.]+)", cmdline)
    if title:
        name = title.group(1).split(".")[0]
        return "Train worker" if name in ("RayTrainWorker", "TrainWorker") else f"ray::{name}"
    for daemon in ("gcs_server", "raylet", "dashboard_agent", "log_monitor", "runtime_env", "monitor.py",
                   "dashboard.py", "default_worker.py"):
        if daemon in cmdline:
            return "ray: " + daemon.replace(".py", "") + (" (idle pool)" if daemon == "default_worker.py" else "")
    if "stage_driver" in cmdline:
        return "driver"
    return cmdline.split(" ")[0].rsplit("/", 1)[-1] or "?"


def sample_until_exit(proc: subprocess.Popen, interval_s: float):
    """Sample every process of `proc`'s session until `proc` exits: (wall seconds, {pid: (what it is, CPU
    seconds)}, [(seconds since start, CPU seconds of the session so far)])."""
    start, last, samples = time.perf_counter(), {}, []
    while proc.poll() is None:
        for pid, (kind, cpu) in _session_processes(proc.pid).items():
            # An exited process (a zombie until reaped) has no command line left: keep what it was; a Train
            # worker stays one (while it runs a method Ray may title it 'ray::execute').
            keep = pid in last and (kind == "?" or last[pid][0] == "Train worker")
            last[pid] = (last[pid][0] if keep else kind, cpu)
        samples.append((time.perf_counter() - start, sum(cpu for _, cpu in last.values())))
        time.sleep(interval_s)
    return time.perf_counter() - start, last, samples


def _local_run_environment(code: Path) -> dict[str, str]:
    """The variables the pipeline gives its stage tasks on a local CPU run, as the code in `code` says."""
    out = subprocess.run([sys.executable, "-c", "import json; from orchestrator.engine.process_env import "
                          "worker_environment as w; print(json.dumps(w(local_cpu=True)))"],
                         cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stage(data: str, tracking_uri: str, workdir: Path, env: dict[str, str], name: str,
           code: Path = REPO) -> dict:
    config = dict(
        name=name, model=dict(name="resnet_tiny", num_classes=10, stem="small", first_last="fp32"),
        data=dict(path=data, train_resolution=32, val_resolution=32, val_crop_ratio=1.0, batch_size=32,
                  num_workers=1, train_crop_scale=[0.35, 1.0]),
        optim=dict(epochs=3, warmup_epochs=1, lr_peak=5e-3), policy=dict(stage="one"),
        scaling=dict(num_workers=2, cpus_per_worker=0.25),
        tracking=dict(tracking_uri=tracking_uri, experiment="stage-cpu"), eval_every_epochs=1,
        storage_path=str(workdir / "ray"))
    cfg_path, result_path = workdir / f"{name}.json", workdir / f"{name}.result.json"
    cfg_path.write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.stage_driver", str(cfg_path), str(result_path)],
                            cwd=code, env={**os.environ, "PYTHONPATH": str(code), **_local_run_environment(code),
                                           **env},
                            stdout=open(workdir / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wall, last, _ = sample_until_exit(proc, 0.25)
    if proc.returncode != 0:
        raise SystemExit(f"the stage failed; its log: {workdir / (name + '.log')}")
    by_kind: dict[str, float] = defaultdict(float)
    for kind, cpu in last.values():
        by_kind[kind] += cpu
    return {"wall_s": wall, "cpu_s": sum(by_kind.values()), "by_kind": dict(by_kind), "processes": len(last)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                        help="a setting to compare against the defaults (one stage per setting and repeat)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="another checkout of the code, run as one more setting (with no --env of its own)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from orchestrator.data.embedded import write_embedded_digits
    from tests.servers import MLflowServer
    settings = [{}] + [dict(item.split("=", 1) for item in spec.split(",")) for spec in args.env]
    codes = [REPO] * len(settings)
    if args.baseline:
        settings.append({})
        codes.append(args.baseline.resolve())
    labels = [str(env or "(defaults)") + ("" if code == REPO else f" code {code}") for env, code in zip(settings, codes)]
    with tempfile.TemporaryDirectory(prefix="stage-cpu-") as tmp:
        workdir = Path(tmp)
        data = str(write_embedded_digits(workdir / "digits"))
        rows = []
        with MLflowServer(workdir / "mlflow") as server:
            for repeat in range(args.repeats):
                for index, env in enumerate(settings):  # interleaved, so drifting load hits every setting
                    result = _stage(data, server.uri, workdir, env, f"s{index}-r{repeat}", codes[index])
                    rows.append((index, result))
                    print(f"setting {index} {labels[index]}: wall {result['wall_s']:.1f} s, "
                          f"CPU {result['cpu_s']:.1f} s", flush=True)
    for index, env in enumerate(settings):
        mine = [r for i, r in rows if i == index]
        kinds = sorted({k for r in mine for k in r["by_kind"]}, key=lambda k: -mine[0]["by_kind"].get(k, 0))
        print(f"\n{labels[index]}: median wall {sorted(r['wall_s'] for r in mine)[len(mine) // 2]:.1f} s, "
              f"median CPU {sorted(r['cpu_s'] for r in mine)[len(mine) // 2]:.1f} s")
        for kind in kinds:
            print(f"  {kind:40s} " + "  ".join(f"{r['by_kind'].get(kind, 0):6.1f}" for r in mine))
    return 0


if __name__ == "__main__":
    sys.exit(main())

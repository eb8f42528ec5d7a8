"""Where the default pipeline's time goes: `pipelines/full_paper.py` run for real (a preset, its own work
dir), every process of its session sampled from /proc once a second until it ends, CPU seconds summed by
what the process is (Ray's title: the stage tasks, Train workers, each Train helper actor, Tune trials,
Ray's daemons), and how many cores were busy over each stretch of the run.

Each --variant is the preset with some settings changed (dotted keys, YAML values); variants and repeats
are interleaved, so drifting load hits each of them alike. Wall time is only comparable on a quiet
machine; CPU seconds grow with contention.

    python bench/pipeline_cpu.py                                        # the embedded preset as it is
    python bench/pipeline_cpu.py --variant scaling.pack_architectures=true
    python bench/pipeline_cpu.py --variant baselines.independent.one_train_run=false --repeats 2
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_cpu import sample_until_exit  # noqa: E402  (the same per-process reading as one stage's bench)

REPO = Path(__file__).resolve().parents[1]
WINDOW_S = 30  # the stretch over which busy cores are averaged


def _role(kind: str) -> str:
    """A stage task's process shows as its task while it runs and as IDLE between tasks."""
    return "stage task (driver of a Train run or sweep)" if kind in ("ray::stage", "ray::IDLE") else kind


def _variant_config(preset: Path, settings: dict, work_dir: Path) -> dict:
    config: dict = {"extends": str(preset.resolve()), "work_dir": str(work_dir)}
    for dotted, value in settings.items():
        node = config
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config


def _pipeline(config_path: Path, log: Path) -> dict:
    proc = subprocess.Popen([sys.executable, "pipelines/full_paper.py", "--config", str(config_path)], cwd=REPO,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    wall, last, samples = sample_until_exit(proc, 1.0)
    if proc.returncode != 0:
        raise SystemExit(f"the pipeline failed; its log: {log}")
    by_role: dict[str, float] = defaultdict(float)
    for kind, cpu in last.values():
        by_role[_role(kind)] += cpu
    busy = []  # mean cores busy in each window
    for begin in range(0, int(wall) + 1, WINDOW_S):
        inside = [(t, c) for t, c in samples if begin <= t < begin + WINDOW_S]
        if len(inside) > 1:
            busy.append((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]))
    return {"wall_s": wall, "cpu_s": sum(by_role.values()), "by_role": dict(by_role), "busy": busy}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "pipelines" / "configs" / "embedded.yaml")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="settings to compare against the preset as it is (one run per variant and repeat)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    variants = [{}] + [{k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in spec.split(","))}
                       for spec in args.variant]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pipeline-cpu-") as tmp:
        for repeat in range(args.repeats):
            for index, settings in enumerate(variants):
                folder = Path(tmp) / f"v{index}-r{repeat}"
                folder.mkdir()
                config_path = folder / "pipeline.yaml"
                config_path.write_text(yaml.safe_dump(_variant_config(args.config, settings, folder / "work")))
                result = _pipeline(config_path, folder / "pipeline.log")
                rows.append((index, result))
                print(f"variant {index} {settings or '(preset)'}: wall {result['wall_s']:.0f} s, CPU "
                      f"{result['cpu_s']:.0f} s", flush=True)
    for index, settings in enumerate(variants):
        mine = [r for i, r in rows if i == index]
        roles = sorted({k for r in mine for k in r["by_role"]}, key=lambda k: -mine[0]["by_role"].get(k, 0))
        print(f"\n{settings or '(preset)'}: wall " + ", ".join(f"{r['wall_s']:.0f}" for r in mine) + " s; CPU "
              + ", ".join(f"{r['cpu_s']:.0f}" for r in mine) + " s")
        for role in roles:
            print(f"  {role:48s} " + "  ".join(f"{r['by_role'].get(role, 0):6.1f}" for r in mine))
        for r in mine:
            print(f"  cores busy per {WINDOW_S} s: " + " ".join(f"{b:.1f}" for b in r["busy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

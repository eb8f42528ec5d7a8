"""What a paper-scale run costs: wall time and GPU-hours of each ImageNet preset on 8, 32 and 128 GPUs, which
of the loader, the network or the all-reduce limits a training step, and how to set Tune's
max_concurrent_trials for the Stage III sweep.

    .venv/bin/python bench/scaling.py [--presets imagenet table1_no_tbn ...] [--gpus 8 32 128] [--workers 2]
                                      [--gpu-check runs/gpu_check.json ...] [--cores-per-gpu 8] ...

The model (every input is a measured figure or a stated assumption, printed with the tables):

- One training step of a stage on W data-parallel workers, global batch B (the preset's), b = B / W per GPU:
      network   = b / (GPU images/s at the stage's precision) [+ b / teacher forward images/s] + step floor,
                  or, where the host's time per step is measured, max(b / GPU images/s, host time per step)
                  [+ the teacher's forward likewise]: the host then sets a floor that no smaller b goes under
      loader    = b / (loader images/s per CPU core * cores per GPU)
      all-reduce= 2 (W-1)/W * gradient bytes / bus bandwidth + 2 (W-1) * latency      (ring; 0 for W = 1)
      step      = max(network, loader) + all-reduce
  The loader prefetches in threads, so it overlaps the network; the engine's ZeRO-1 config does not overlap
  the gradient reduction with the backward pass, so it adds. The limit is the largest of the three terms.
  Gradient bytes = every trainable parameter (all Transitional BN entries, step sizes) x 4 bytes; the
  parameters are counted with the stage's own model built on the meta device.
- A stage = start-up + epochs x steps per epoch x step + its evaluations (every eval_every epochs and at the
  end; one pass for the FP32 stage, one per bit-width plus one per Rand. seed otherwise; forward only, at
  3x the training images/s, limited by the loader; a sweep trial also scores its held-out slice).
- The plan (orchestrator.pipeline.plan.build_plan) gives every stage, its dependencies and its teacher.
  The Stage III sweep is its trials; with ASHA (reduction factor 4, Ray's default) trial i runs to the last
  rung that ceil(trials / 4**r) trials reach (synchronous successive halving: an estimate of the
  asynchronous scheduler). Stages and trials are placed greedily in plan order on the free GPUs, W each.
- GPU-hours: "busy" = sum over stages of duration x W; "held" = GPUs x wall time (what a reserved cluster
  costs).
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000
ASHA_REDUCTION = 4  # ray.tune.schedulers.ASHAScheduler's default reduction_factor
PRESETS = ("imagenet", "table1_no_tbn", "table2_distillation", "table3_bits_4321", "table4_ternary_binary",
           "table5_quantizers")


# -- inputs -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    """Training images/s of one GPU at a per-GPU batch that fills it: the FP32 engine (TF32 convs), the
    plain network in bf16 (the FP32 teacher stage: the engine runs bf16 on GPU), and the quantized stages
    (Bit-Mixer in bf16) as a share of the FP32 figure."""

    fp32: float
    bf16: float
    quantized_over_fp32: float
    # The host's time per training step (Python, kernel launches, the optimizer's per-tensor work), which no
    # per-GPU batch goes under; 0 = unknown, and Hardware.step_floor_s adds to the GPU time instead.
    host_step_s_bf16: float = 0.0
    host_step_s_quantized: float = 0.0

    @property
    def quantized(self) -> float:
        return self.fp32 * self.quantized_over_fp32

    def host_step_s(self, precision: str) -> float:
        return self.host_step_s_bf16 if precision == "bf16" else self.host_step_s_quantized


@dataclass(frozen=True)
class Hardware:
    gpus_per_node: int = 8
    cores_per_gpu: float = 8.0
    loader_images_per_s_per_core: float = 800.0  # docs/scaling.md, "Inputs": from bench/loader.py's ImageNet-like figures
    intra_node_bus_GBps: float = 300.0
    inter_node_bus_GBps: float = 45.0
    latency_s: float = 10e-6
    gradient_bytes_per_parameter: int = 4
    step_floor_s: float = 0.004
    stage_startup_s: float = 120.0


# Assumed per-GPU figures for an H100 SXM (no GPU measurement yet; bench/gpu_check.sh replaces ResNet-18's).
# Derived from public PyTorch ResNet-50 v1.5 figures (NVIDIA DeepLearningExamples: about 1,100-1,400 img/s
# TF32 and 2,500-2,700 img/s AMP per A100 80GB) times about 1.5 for an H100, and from the FLOP ratio for
# the other depths (ResNet-18 1.8, ResNet-34 3.6, ResNet-50 4.1 GFLOPs); the EBN variants (ResNet-18 depth,
# grouped convs: fewer FLOPs, less efficient kernels) are taken at ResNet-18's figures. Quantized stages at
# 0.8x FP32 is the project's goal for Stage III, not a measurement.
ASSUMED_H100 = {
    "resnet18": Throughput(fp32=3600.0, bf16=7200.0, quantized_over_fp32=0.8),
    "resnet34": Throughput(fp32=2000.0, bf16=4000.0, quantized_over_fp32=0.8),
    "resnet50": Throughput(fp32=1800.0, bf16=3800.0, quantized_over_fp32=0.8),
    "ebn_4_8_8_16": Throughput(fp32=3600.0, bf16=7200.0, quantized_over_fp32=0.8),
    "ebn_4_8_16_32": Throughput(fp32=3600.0, bf16=7200.0, quantized_over_fp32=0.8),
    "ebn_4_4_4_4": Throughput(fp32=3600.0, bf16=7200.0, quantized_over_fp32=0.8),
}


# -- one step -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepTime:
    network_s: float
    loader_s: float
    allreduce_s: float
    host_bound: bool = False  # the network term is the host's time per step, not the GPU's

    @property
    def seconds(self) -> float:
        return max(self.network_s, self.loader_s) + self.allreduce_s

    @property
    def limit(self) -> str:
        terms = {"host" if self.host_bound else "network": self.network_s, "loader": self.loader_s,
                 "all-reduce": self.allreduce_s}
        return max(terms, key=terms.get)


def allreduce_seconds(gradient_bytes: float, workers: int, bus_bytes_per_s: float, latency_s: float) -> float:
    """Ring all-reduce of `gradient_bytes` over `workers` GPUs (nccl-tests' bus bandwidth convention)."""
    if workers <= 1:
        return 0.0
    return 2 * (workers - 1) / workers * gradient_bytes / bus_bytes_per_s + 2 * (workers - 1) * latency_s


def step_time(*, global_batch: int, workers: int, images_per_s: float, parameters: int, hw: Hardware,
              teacher_forward_images_per_s: float | None = None, host_step_s: float = 0.0,
              teacher_host_s: float = 0.0) -> StepTime:
    """A known host time per step is a floor (the GPU waits for it whatever its batch), the teacher's
    forward likewise; else the assumed step floor adds to the GPU time."""
    per_gpu = global_batch / workers
    host_bound = host_step_s > per_gpu / images_per_s
    network = host_step_s if host_bound else per_gpu / images_per_s + (0.0 if host_step_s else hw.step_floor_s)
    if teacher_forward_images_per_s:
        network += max(per_gpu / teacher_forward_images_per_s, teacher_host_s)
    loader = per_gpu / (hw.loader_images_per_s_per_core * hw.cores_per_gpu)
    bus = (hw.intra_node_bus_GBps if workers <= hw.gpus_per_node else hw.inter_node_bus_GBps) * 1e9
    reduce = allreduce_seconds(parameters * hw.gradient_bytes_per_parameter, workers, bus, hw.latency_s)
    return StepTime(network, loader, reduce, host_bound)


# -- one stage ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageWork:
    """What one stage (or one sweep trial) trains, independent of the hardware."""

    key: str
    arch: str
    precision: str              # "bf16" (the FP32 teacher stage) | "quantized"
    epochs: int
    global_batch: int
    eval_every: int
    eval_passes: int            # forward passes over the validation set per evaluation
    parameters: int
    teacher: str | None = None  # architecture of the distillation teacher (forward only, bf16)
    holdout_fraction: float = 0.0
    deps: tuple[str, ...] = ()
    group: str | None = None    # the sweep this trial belongs to


def evaluation_epochs(epochs: int, eval_every: int) -> int:
    return sum(1 for e in range(epochs) if (e + 1) % eval_every == 0 or e == epochs - 1)


def stage_seconds(work: StageWork, workers: int, throughput: dict[str, Throughput], hw: Hardware,
                  train_images: int = IMAGENET_TRAIN_IMAGES, val_images: int = IMAGENET_VAL_IMAGES
                  ) -> tuple[float, StepTime]:
    """Seconds of one stage on `workers` GPUs, and its training step."""
    rate = throughput[work.arch]
    images_per_s = rate.bf16 if work.precision == "bf16" else rate.quantized
    teacher = 3 * throughput[work.teacher].bf16 if work.teacher else None  # a forward is ~1/3 of a step
    teacher_host = throughput[work.teacher].host_step_s_bf16 / 3 if work.teacher else 0.0
    step = step_time(global_batch=work.global_batch, workers=workers, images_per_s=images_per_s,
                     parameters=work.parameters, hw=hw, teacher_forward_images_per_s=teacher,
                     host_step_s=rate.host_step_s(work.precision), teacher_host_s=teacher_host)
    trained = train_images * (1 - work.holdout_fraction)
    steps_per_epoch = math.ceil(trained / work.global_batch)
    forward_per_gpu = min(3 * images_per_s, hw.loader_images_per_s_per_core * hw.cores_per_gpu)
    scored = work.eval_passes * (val_images + train_images * work.holdout_fraction)
    evaluations = evaluation_epochs(work.epochs, work.eval_every) * scored / (forward_per_gpu * workers)
    return hw.stage_startup_s + work.epochs * steps_per_epoch * step.seconds + evaluations, step


def asha_trial_epochs(trials: int, grace: int, max_epochs: int, reduction: int = ASHA_REDUCTION) -> list[int]:
    """Epochs each trial trains under successive halving, longest first: rungs at grace * reduction**r below
    max_epochs, then max_epochs; ceil(trials / reduction**r) trials reach rung r."""
    rungs, r = [], grace
    while r < max_epochs:
        rungs.append(r)
        r *= reduction
    rungs.append(max_epochs)
    reach = [math.ceil(trials / reduction**i) for i in range(len(rungs))]
    return [max(rung for rung, n in zip(rungs, reach) if i < n) for i in range(trials)]


# -- the plan on a cluster ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    key: str
    gpus: int
    seconds: float
    deps: tuple[str, ...] = ()
    group: str | None = None
    limit: str = "network"


@dataclass
class Schedule:
    wall_s: float
    busy_gpu_s: float
    starts: dict[str, float] = field(default_factory=dict)


def simulate(jobs: list[Job], gpus: int, concurrency: dict[str, int] | None = None) -> Schedule:
    """Greedy list scheduling in list order on `gpus` GPUs: a job starts as soon as its dependencies are done
    and `job.gpus` are free (later jobs may pass a blocked one). A dependency names a job or a group, which is
    done when all its jobs are; at most concurrency[group] jobs of a group run at once."""
    concurrency = concurrency or {}
    too_big = [j.key for j in jobs if j.gpus > gpus]
    if too_big:
        raise ValueError(f"{too_big[0]} needs more GPUs than the {gpus} given; use more GPUs or fewer workers.")
    groups: dict[str, int] = {}
    for j in jobs:
        if j.group:
            groups[j.group] = groups.get(j.group, 0) + 1
    waiting, running, done = list(jobs), [], {}
    group_done: dict[str, int] = {}
    now, free, starts = 0.0, gpus, {}

    def finished(dep: str) -> bool:
        return dep in done or (dep in groups and group_done.get(dep, 0) == groups[dep])

    while waiting or running:
        started = True
        while started:
            started = False
            for job in list(waiting):
                active = sum(1 for _, r in running if r.group and r.group == job.group)
                if job.gpus <= free and all(finished(d) for d in job.deps) and (
                        job.group is None or active < concurrency.get(job.group, math.inf)):
                    waiting.remove(job)
                    running.append((now + job.seconds, job))
                    starts[job.key], free, started = now, free - job.gpus, True
        if not running:
            raise ValueError(f"{waiting[0].key} waits for a dependency that never runs.")
        running.sort(key=lambda item: item[0])
        now, job = running.pop(0)
        free += job.gpus
        done[job.key] = now
        if job.group:
            group_done[job.group] = group_done.get(job.group, 0) + 1
    return Schedule(wall_s=now, busy_gpu_s=sum(j.gpus * j.seconds for j in jobs), starts=starts)


def jobs_for(works: list[StageWork], workers: int, throughput: dict[str, Throughput], hw: Hardware) -> list[Job]:
    jobs = []
    for work in works:
        seconds, step = stage_seconds(work, workers, throughput, hw)
        jobs.append(Job(work.key, workers, seconds, work.deps, work.group, step.limit))
    return jobs


def best_concurrency(works: list[StageWork], workers: int, gpus: int, throughput: dict[str, Throughput],
                     hw: Hardware, tolerance: float = 0.01) -> tuple[dict[str, int], Schedule]:
    """The smallest max_concurrent_trials (the same for every sweep) whose wall time is within `tolerance`
    of the best; trials beyond that only queue for GPUs other stages could use."""
    jobs = jobs_for(works, workers, throughput, hw)
    sweeps = sorted({j.group for j in jobs if j.group})
    if not sweeps:
        return {}, simulate(jobs, gpus)
    largest = max(sum(1 for j in jobs if j.group == g) for g in sweeps)
    runs = {c: simulate(jobs, gpus, {g: c for g in sweeps}) for c in range(1, largest + 1)}
    fastest = min(s.wall_s for s in runs.values())
    c = min(c for c, s in runs.items() if s.wall_s <= fastest * (1 + tolerance))
    return {g: c for g in sweeps}, runs[c]


# -- reading the presets --------------------------------------------------------------------------------------
def count_parameters(model_config) -> int:
    """Trainable parameters of the stage's model, built on the meta device (shapes only, no memory)."""
    import torch
    with torch.device("meta"):
        net = model_config.build()
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def preset_work(path: Path) -> tuple[list[StageWork], dict]:
    """Every stage (and sweep trial) of a preset, through the pipeline's own loader and planner."""
    from orchestrator.pipeline.config import load_pipeline_config
    from orchestrator.pipeline.plan import build_plan
    cfg = load_pipeline_config(path)
    plan = build_plan(cfg, data_path="/data")
    parameters: dict[str, int] = {}
    works = []
    sweep = cfg.sweep
    for node in plan.order():
        c = node.config
        model_key = c.model.model_dump_json()
        if model_key not in parameters:
            parameters[model_key] = count_parameters(c.model)
        teacher = plan.nodes[node.teacher_after].arch if node.teacher_after else None
        fp32 = c.policy.stage == "fp32"
        base = StageWork(key=node.key, arch=node.arch, precision="bf16" if fp32 else "quantized",
                         epochs=c.optim.epochs, global_batch=c.data.batch_size, eval_every=c.eval_every_epochs,
                         eval_passes=1 if fp32 else len(c.model.bits_activations) + len(c.rand_seeds),
                         parameters=parameters[model_key], teacher=teacher,
                         deps=tuple(plan.upstream(node)))
        if not node.sweep:
            works.append(base)
            continue
        epochs = (asha_trial_epochs(sweep.num_trials, sweep.grace_period, c.optim.epochs) if sweep.asha
                  else [c.optim.epochs] * sweep.num_trials)
        works += [replace(base, key=f"{node.key}#trial{i}", epochs=e, group=node.key,
                          holdout_fraction=sweep.holdout_fraction) for i, e in enumerate(epochs)]
    facts = {"stages": sum(1 for n in plan.nodes.values() if not n.sweep),
             "sweeps": sum(1 for n in plan.nodes.values() if n.sweep),
             "trials": sweep.num_trials if sweep.enabled else 0, "asha": sweep.asha,
             "workers": cfg.scaling.num_workers, "cores_per_worker": cfg.scaling.cpus_per_worker,
             "epochs": sorted({w.epochs for w in works}), "global_batch": cfg.data.batch_size,
             "max_concurrent_trials": sweep.max_concurrent_trials}
    return works, facts


def throughput_from_gpu_check(paths: Path | list[Path], assumed: dict[str, Throughput],
                              layers: dict[str, int] | None = None) -> dict[str, Throughput]:
    """Measured figures from bench/gpu_check.sh's JSON files, one per architecture (its "model"; each figure
    at its faster memory format).

    A measured architecture takes its FP32 and Stage III images/s (its bf16 figure scales with its FP32 one),
    and its wall time per step at the measured batch as the host's time per step (`host_step_s`): the
    profiled ResNet-18 steps kept the GPU busy for about half their wall time, i.e. the GPU waited on the
    host. Every other architecture scales by ResNet-18's measured / assumed FP32 (or the first measured one's), takes that
    architecture's quantized share, and its host time per step in proportion to its quantized layers
    (`layers`, counted by `quantized_layer_counts`; the host's work is per layer)."""
    measured: dict[str, Throughput] = {}
    for path in [paths] if isinstance(paths, Path) else paths:
        figures = json.loads(path.read_text())
        if figures.get("card") == "CPU dry run":
            raise ValueError(f"{path} holds a CPU dry run's figures, which mean nothing; pass the JSON of "
                             "bench/gpu_check.sh run on a GPU.")
        best: dict[str, dict] = {}
        for run in figures["runs"]:
            if run["images_per_s"] > best.get(run["name"], {}).get("images_per_s", 0.0):
                best[run["name"]] = run
        arch, batch = figures.get("model", "resnet18"), figures.get("batch", 0)
        t, fp32, three = assumed[arch], best["fp32"]["images_per_s"], best["three"]["images_per_s"]
        measured[arch] = Throughput(fp32=fp32, bf16=t.bf16 * fp32 / t.fp32, quantized_over_fp32=three / fp32,
                                    host_step_s_bf16=host_step_s(best["fp32"], batch),
                                    host_step_s_quantized=host_step_s(best["three"], batch))
    reference = "resnet18" if "resnet18" in measured else next(iter(measured))
    ref = measured[reference]
    scale = ref.fp32 / assumed[reference].fp32
    result = {}
    for arch, t in assumed.items():
        if arch in measured:
            result[arch] = measured[arch]
            continue
        per_layer = layers[arch] / layers[reference] if layers else 0.0
        result[arch] = Throughput(fp32=t.fp32 * scale, bf16=t.bf16 * scale, quantized_over_fp32=ref.quantized_over_fp32,
                                  host_step_s_bf16=ref.host_step_s_bf16 * per_layer,
                                  host_step_s_quantized=ref.host_step_s_quantized * per_layer)
    return result


def host_step_s(run: dict, batch: int) -> float:
    """The host's time per step from one gpu_check run: its wall time per step, unless its profile (PROFILE_STEPS)
    shows the GPU busy for most of the step (then the GPU sets the pace and the host's share is unknown: 0)."""
    wall_s = batch / run["images_per_s"]
    busy_ms = run.get("profile", {}).get("gpu_busy_ms")
    if busy_ms is not None and busy_ms / 1e3 >= 0.8 * wall_s:
        return 0.0
    return wall_s


def quantized_layer_counts(archs) -> dict[str, int]:
    """Quantized convolutions and FC of each architecture (ImageNet stem), built on the meta device."""
    import torch

    import bitmixer_core as core
    counts = {}
    for arch in archs:
        with torch.device("meta"):
            net = core.build_model(arch, num_classes=1000)
        counts[arch] = sum(1 for m in net.modules() if isinstance(m, core.QuantizedLayerMixin))
    return counts


# -- report ---------------------------------------------------------------------------------------------------
def limit_table(throughput: dict[str, Throughput], hw: Hardware, parameters: dict[str, int], global_batch: int,
                widths=(8, 32, 128)) -> list[str]:
    lines = ["| architecture | stage | workers | per-GPU batch | network ms | loader ms | all-reduce ms | step ms "
             "| limit | epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, count in parameters.items():
        for precision in ("bf16", "quantized"):
            rate = throughput[arch].bf16 if precision == "bf16" else throughput[arch].quantized
            for w in widths:
                s = step_time(global_batch=global_batch, workers=w, images_per_s=rate, parameters=count, hw=hw,
                              host_step_s=throughput[arch].host_step_s(precision))
                epoch = math.ceil(IMAGENET_TRAIN_IMAGES / global_batch) * s.seconds
                lines.append(f"| {arch} | {'FP32 teacher (bf16)' if precision == 'bf16' else 'quantized'} | {w} | "
                             f"{global_batch / w:g} | {s.network_s * 1e3:.1f} | {s.loader_s * 1e3:.1f} | "
                             f"{s.allreduce_s * 1e3:.1f} | {s.seconds * 1e3:.1f} | {s.limit} | {epoch / 60:.1f} min |")
    return lines


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.0f} h" if seconds >= 36000 else f"{seconds / 3600:,.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--gpus", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--workers", type=int, help="GPUs per stage (default: each preset's scaling.num_workers)")
    parser.add_argument("--gpu-check", type=Path, nargs="+",
                        help="bench/gpu_check.sh's JSON files (one per architecture): measured figures")
    defaults = Hardware()
    for name in Hardware.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)), default=None)
    args = parser.parse_args()
    configs = Path(__file__).resolve().parent.parent / "pipelines" / "configs"

    unknown = [p for p in args.presets if not (configs / f"{p}.yaml").is_file()]
    if unknown:
        parser.error(f"no preset {unknown[0]!r} in {configs}; give one of "
                     f"{sorted(f.stem for f in configs.glob('*.yaml'))}.")
    throughput = ASSUMED_H100
    source = "assumed (no GPU measurement; see docs/scaling.md)"
    if args.gpu_check:
        try:
            throughput = throughput_from_gpu_check(args.gpu_check, ASSUMED_H100,
                                                   quantized_layer_counts(ASSUMED_H100))
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--gpu-check {' '.join(str(path) for path in args.gpu_check)}: {err}")
        source = f"measured ({', '.join(str(path) for path in args.gpu_check)})"
    presets = {p: preset_work(configs / f"{p}.yaml") for p in args.presets}
    first = next(iter(presets.values()))[1]
    hw_defaults = {"cores_per_gpu": first["cores_per_worker"]}
    hw = replace(defaults, **hw_defaults, **{k: v for k, v in vars(args).items()
                                             if k in Hardware.__dataclass_fields__ and v is not None})

    print(f"GPU images/s per GPU: {source}")
    for arch, t in throughput.items():
        host = (f"  host per step: bf16 {t.host_step_s_bf16 * 1e3:.0f} ms, quantized "
                f"{t.host_step_s_quantized * 1e3:.0f} ms" if t.host_step_s_quantized else "")
        print(f"  {arch:14s} fp32 {t.fp32:7.0f}  bf16 {t.bf16:7.0f}  quantized {t.quantized:7.0f} "
              f"({t.quantized_over_fp32:.2f}x fp32){host}")
    print("hardware: " + ", ".join(f"{k}={v}" for k, v in vars(hw).items()))
    print()

    parameters = {}
    for works, _ in presets.values():
        for w in works:
            if w.arch not in parameters and w.precision == "quantized":
                parameters[w.arch] = w.parameters
    print(f"## One training step, global batch {first['global_batch']} (the presets'), workers = GPUs of one stage\n")
    print("\n".join(limit_table(throughput, hw, parameters, first["global_batch"], tuple(args.gpus))))
    print("\nParameters (all Transitional BN entries and step sizes; 4-byte gradients): "
          + ", ".join(f"{a} {n / 1e6:.2f} M" for a, n in parameters.items()))

    per_stage = args.workers or first["workers"]
    print(f"\n## Each preset on a cluster (stages of W = {per_stage} GPUs each, packed on the GPUs; "
          "or every stage on all GPUs one after another)\n")
    print(f"| preset | stages | sweep trials | GPUs | wall, W={per_stage} packed | busy GPU-h | held GPU-h | wall, W=GPUs "
          "| held GPU-h | step limit (share of training time) | max_concurrent_trials (wall if unset) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (works, facts) in presets.items():
        for gpus in args.gpus:
            workers = min(args.workers or facts["workers"], gpus)
            concurrency, packed = best_concurrency(works, workers, gpus, throughput, hw)
            jobs = jobs_for(works, workers, throughput, hw)
            share: dict[str, float] = {}
            for j in jobs:
                share[j.limit] = share.get(j.limit, 0.0) + j.seconds * j.gpus
            top = max(share, key=share.get)
            wide_jobs = jobs_for(works, gpus, throughput, hw)
            wide = simulate(wide_jobs, gpus)
            trials = f"{facts['trials']}{' (ASHA)' if facts['asha'] else ''}" if facts["trials"] else "-"
            conc = "-"
            if concurrency:  # unset, the sweep starts as many trials as the whole cluster fits (sweep.py)
                unset = simulate(jobs, gpus, {g: max(1, gpus // workers) for g in concurrency})
                conc = f"{next(iter(concurrency.values()))} ({unset.wall_s / 86400:.1f} d)"
            print(f"| {name} | {facts['stages']} | {trials} | {gpus} | {packed.wall_s / 86400:.1f} d | "
                  f"{hours(packed.busy_gpu_s)} | {hours(gpus * packed.wall_s)} | {wide.wall_s / 86400:.1f} d | "
                  f"{hours(gpus * wide.wall_s)} | {top} ({share[top] / sum(share.values()):.0%}) | {conc} |")


if __name__ == "__main__":
    main()

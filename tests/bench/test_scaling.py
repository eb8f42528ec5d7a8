"""bench/scaling.py's cost model on hand-made inputs: the step's three terms, the ring all-reduce, ASHA's
trial lengths, the greedy cluster schedule and the choice of max_concurrent_trials. Pure arithmetic: no
preset is read, no model is built."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def hardware(scaling, **changes):
    """Round numbers: 1 GB/s bus, no latency, no floor, no start-up, 1 core per GPU at 1,000 images/s."""
    base = dict(gpus_per_node=8, cores_per_gpu=1, loader_images_per_s_per_core=1000.0, intra_node_bus_GBps=1.0,
                inter_node_bus_GBps=1.0, latency_s=0.0, gradient_bytes_per_parameter=4, step_floor_s=0.0,
                stage_startup_s=0.0)
    return scaling.Hardware(**{**base, **changes})


def test_allreduce_is_zero_on_one_worker_and_tends_to_twice_the_bytes(scaling):
    """Ring all-reduce: 2 (W-1)/W * bytes / bandwidth (+ 2 (W-1) latencies); nothing to reduce on one GPU."""
    assert scaling.allreduce_seconds(4e9, 1, 1e9, 1e-3) == 0.0
    assert scaling.allreduce_seconds(4e9, 2, 1e9, 0.0) == pytest.approx(4.0)
    assert scaling.allreduce_seconds(4e9, 4, 1e9, 0.0) == pytest.approx(6.0)
    assert scaling.allreduce_seconds(4e9, 1000, 1e9, 0.0) == pytest.approx(8.0 * 999 / 1000)
    assert scaling.allreduce_seconds(0, 5, 1e9, 1e-3) == pytest.approx(8e-3)


def test_doubling_gpus_halves_the_network_time_until_the_allreduce_binds(scaling):
    """With a fixed global batch the per-GPU batch halves with every doubling, so the network (and loader)
    terms halve; the all-reduce grows towards 2 x bytes / bandwidth and, once it is the largest term, the
    step stops halving."""
    hw = hardware(scaling, loader_images_per_s_per_core=1e12, inter_node_bus_GBps=100.0, intra_node_bus_GBps=100.0)
    steps = {w: scaling.step_time(global_batch=1024, workers=w, images_per_s=1000.0, parameters=10**9, hw=hw)
             for w in (1, 2, 4, 8, 16, 32, 64)}
    for w in (1, 2, 4, 8, 16, 32):
        assert steps[2 * w].network_s == pytest.approx(steps[w].network_s / 2)
    assert steps[1].allreduce_s == 0.0
    assert steps[1].limit == steps[2].limit == "network"
    # 4e9 bytes at 1e11 B/s: all-reduce 40 ms x 2 (W-1)/W, network 1024/W ms.
    assert steps[2].seconds == pytest.approx(0.512 + 0.040)
    assert steps[64].allreduce_s == pytest.approx(0.080 * 63 / 64)
    assert steps[64].limit == "all-reduce"
    assert steps[64].seconds > steps[32].seconds / 2


def test_a_slow_loader_sets_the_step_and_overlaps_the_network(scaling):
    """The loader prefetches in parallel with the network: step = max(network, loader) + all-reduce."""
    hw = hardware(scaling, loader_images_per_s_per_core=100.0)
    step = scaling.step_time(global_batch=64, workers=2, images_per_s=1000.0, parameters=0, hw=hw)
    assert step.loader_s == pytest.approx(0.32)
    assert step.network_s == pytest.approx(0.032)
    assert step.seconds == pytest.approx(0.32)
    assert step.limit == "loader"
    more_cores = scaling.step_time(global_batch=64, workers=2, images_per_s=1000.0, parameters=0,
                                   hw=hardware(scaling, loader_images_per_s_per_core=100.0, cores_per_gpu=20))
    assert more_cores.limit == "network" and more_cores.seconds == pytest.approx(0.032)


def test_teacher_forward_and_step_floor_add_to_the_network(scaling):
    hw = hardware(scaling, step_floor_s=0.01)
    step = scaling.step_time(global_batch=100, workers=1, images_per_s=1000.0, parameters=0, hw=hw,
                             teacher_forward_images_per_s=500.0)
    assert step.network_s == pytest.approx(0.1 + 0.2 + 0.01)


def test_a_measured_host_time_is_a_floor_no_smaller_batch_goes_under(scaling):
    """With the host's time per step known, the network term is the larger of the GPU's time and the host's
    (the limit then reads "host"), and the assumed step floor no longer adds."""
    hw = scaling.Hardware(step_floor_s=0.004)
    big = scaling.step_time(global_batch=256, workers=1, images_per_s=2000.0, parameters=0, hw=hw, host_step_s=0.05)
    assert big.network_s == pytest.approx(0.128) and not big.host_bound
    small = scaling.step_time(global_batch=256, workers=8, images_per_s=2000.0, parameters=0, hw=hw,
                              host_step_s=0.05)
    assert small.network_s == pytest.approx(0.05) and small.limit == "host"
    unknown = scaling.step_time(global_batch=256, workers=8, images_per_s=2000.0, parameters=0, hw=hw)
    assert unknown.network_s == pytest.approx(0.016 + 0.004) and unknown.limit == "network"


def test_bus_bandwidth_switches_to_inter_node_past_one_node(scaling):
    hw = hardware(scaling, intra_node_bus_GBps=100.0, inter_node_bus_GBps=10.0, gpus_per_node=8)
    inside = scaling.step_time(global_batch=64, workers=8, images_per_s=1e9, parameters=10**9, hw=hw)
    across = scaling.step_time(global_batch=64, workers=16, images_per_s=1e9, parameters=10**9, hw=hw)
    assert inside.allreduce_s == pytest.approx(2 * 7 / 8 * 4e9 / 100e9)
    assert across.allreduce_s == pytest.approx(2 * 15 / 16 * 4e9 / 10e9)


def test_evaluation_epochs_count_every_nth_and_the_last(scaling):
    assert scaling.evaluation_epochs(160, 5) == 32
    assert scaling.evaluation_epochs(10, 3) == 4  # epochs 3, 6, 9 and the last (10)
    assert scaling.evaluation_epochs(1, 5) == 1


def test_stage_seconds_is_startup_plus_steps_plus_evaluations(scaling):
    hw = hardware(scaling, stage_startup_s=100.0)
    t = {"net": scaling.Throughput(fp32=1000.0, bf16=2000.0, quantized_over_fp32=0.5)}
    work = scaling.StageWork(key="a", arch="net", precision="quantized", epochs=2, global_batch=100, eval_every=1,
                             eval_passes=3, parameters=0)
    seconds, step = scaling.stage_seconds(work, 1, t, hw, train_images=1000, val_images=100)
    # 10 steps of 100 images at 500 images/s (quantized = 0.5 x fp32) per epoch; evaluation: 2 epochs x 3 passes
    # x 100 images at min(3 x 500, loader 1000) images/s.
    assert step.seconds == pytest.approx(0.2)
    assert seconds == pytest.approx(100.0 + 2 * 10 * 0.2 + 2 * 3 * 100 / 1000.0)
    doubled, _ = scaling.stage_seconds(scaling.StageWork(**{**work.__dict__, "epochs": 4}), 1, t, hw,
                                       train_images=1000, val_images=100)
    assert doubled - 100.0 == pytest.approx(2 * (seconds - 100.0))


def test_asha_trials_stop_at_rungs_of_a_quarter(scaling):
    """12 trials, grace 20, 160 epochs, reduction 4: all reach 20, ceil(12/4) = 3 reach 80, 1 reaches 160."""
    assert scaling.asha_trial_epochs(12, 20, 160) == [160, 80, 80] + [20] * 9
    assert scaling.asha_trial_epochs(4, 200, 160) == [160] * 4
    assert scaling.asha_trial_epochs(1, 20, 160) == [160]
    assert scaling.asha_trial_epochs(16, 10, 160) == [160] + [40] * 3 + [10] * 12  # rungs 10, 40, 160


def test_schedule_runs_independent_jobs_side_by_side_only_when_gpus_allow(scaling):
    jobs = [scaling.Job("a", 8, 10.0), scaling.Job("b", 8, 6.0)]
    assert scaling.simulate(jobs, 16).wall_s == pytest.approx(10.0)
    assert scaling.simulate(jobs, 8).wall_s == pytest.approx(16.0)
    assert scaling.simulate(jobs, 16).busy_gpu_s == pytest.approx(8 * 16.0)


def test_schedule_waits_for_dependencies_and_whole_sweeps(scaling):
    """A stage starts after its dependencies; a dependency on a sweep waits for all of its trials."""
    jobs = [scaling.Job("one", 8, 5.0), scaling.Job("two", 8, 5.0, deps=("one",)),
            scaling.Job("t0", 8, 4.0, deps=("two",), group="sweep"), scaling.Job("t1", 8, 9.0, deps=("two",),
                                                                               group="sweep"),
            scaling.Job("after", 8, 1.0, deps=("sweep",))]
    run = scaling.simulate(jobs, 64)
    assert run.starts["two"] == pytest.approx(5.0)
    assert run.starts["t0"] == run.starts["t1"] == pytest.approx(10.0)
    assert run.starts["after"] == pytest.approx(19.0)
    serial = scaling.simulate(jobs, 64, {"sweep": 1})
    assert serial.wall_s == pytest.approx(5 + 5 + 4 + 9 + 1)


def test_schedule_refuses_a_job_larger_than_the_cluster(scaling):
    with pytest.raises(ValueError, match="needs more GPUs"):
        scaling.simulate([scaling.Job("big", 16, 1.0)], 8)


def test_best_concurrency_is_the_smallest_that_reaches_the_fastest_wall_time(scaling):
    """Four equal trials of 8 GPUs: on 32 GPUs all four at once is fastest; on 8 GPUs one at a time is
    as fast as any other setting, so 1."""
    hw = hardware(scaling)
    t = {"net": scaling.Throughput(fp32=1000.0, bf16=1000.0, quantized_over_fp32=1.0)}
    trials = [scaling.StageWork(key=f"t{i}", arch="net", precision="quantized", epochs=1, global_batch=100,
                                eval_every=1, eval_passes=0, parameters=0, group="sweep") for i in range(4)]
    concurrency, run = scaling.best_concurrency(trials, 8, 32, t, hw)
    assert concurrency == {"sweep": 4}
    one_epoch = math.ceil(scaling.IMAGENET_TRAIN_IMAGES / 100) * 100 / 1000.0
    assert run.wall_s == pytest.approx(one_epoch / 8, rel=1e-9)
    concurrency, _ = scaling.best_concurrency(trials, 8, 8, t, hw)
    assert concurrency == {"sweep": 1}


def test_gpu_check_figures_replace_the_assumed_ones(scaling, tmp_path):
    """The measured FP32 figure scales every architecture; the measured Stage III / FP32 share replaces the
    assumed one; each run counts at its faster memory format."""
    figures = {"runs": [{"name": "fp32", "images_per_s": 1000.0}, {"name": "fp32", "images_per_s": 1800.0},
                        {"name": "three", "images_per_s": 900.0}, {"name": "plain", "images_per_s": 5.0}]}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(figures))
    assumed = {"resnet18": scaling.Throughput(fp32=3600.0, bf16=7200.0, quantized_over_fp32=0.8),
               "resnet50": scaling.Throughput(fp32=1200.0, bf16=2400.0, quantized_over_fp32=0.8)}
    measured = scaling.throughput_from_gpu_check(path, assumed)
    assert measured["resnet18"].fp32 == pytest.approx(1800.0)
    assert measured["resnet18"].quantized == pytest.approx(900.0)
    assert measured["resnet50"].fp32 == pytest.approx(600.0)
    assert measured["resnet50"].bf16 == pytest.approx(1200.0)
    assert measured["resnet50"].quantized_over_fp32 == pytest.approx(0.5)


def test_each_measured_architecture_keeps_its_own_figures(scaling, tmp_path):
    """With a JSON per architecture, each measured one takes its own FP32 and Stage III figures; the others
    still scale by ResNet-18's."""
    paths = []
    for model, fp32, three in (("resnet18", 1800.0, 900.0), ("resnet50", 700.0, 560.0)):
        paths.append(tmp_path / f"{model}.json")
        runs = [{"name": "fp32", "images_per_s": fp32}, {"name": "three", "images_per_s": three}]
        paths[-1].write_text(json.dumps({"model": model, "batch": 64, "runs": runs}))
    assumed = {name: scaling.Throughput(fp32=f, bf16=2 * f, quantized_over_fp32=0.8)
               for name, f in (("resnet18", 3600.0), ("resnet34", 2000.0), ("resnet50", 1200.0))}
    measured = scaling.throughput_from_gpu_check(paths, assumed, layers={"resnet18": 20, "resnet34": 36,
                                                                          "resnet50": 53})
    assert measured["resnet50"].fp32 == pytest.approx(700.0) and measured["resnet50"].quantized == pytest.approx(560.0)
    assert measured["resnet50"].bf16 == pytest.approx(1400.0)
    assert measured["resnet34"].fp32 == pytest.approx(1000.0) and measured["resnet34"].quantized_over_fp32 == 0.5
    # The host's time per step: a measured architecture's wall time per step at its batch (64 here) ...
    assert measured["resnet50"].host_step_s_quantized == pytest.approx(64 / 560.0)
    assert measured["resnet18"].host_step_s_bf16 == pytest.approx(64 / 1800.0)
    # ... and ResNet-18's in proportion to the quantized layers for an unmeasured one.
    assert measured["resnet34"].host_step_s_quantized == pytest.approx(64 / 900.0 * 36 / 20)


def test_a_profile_that_shows_the_gpu_busy_gives_no_host_floor(scaling):
    """A run whose profile has the GPU busy for most of the step is GPU-bound: its wall time is no host floor."""
    run = {"images_per_s": 1000.0}  # 64 images: 64 ms a step
    assert scaling.host_step_s(run, 64) == pytest.approx(0.064)
    assert scaling.host_step_s({**run, "profile": {"gpu_busy_ms": 30.0}}, 64) == pytest.approx(0.064)
    assert scaling.host_step_s({**run, "profile": {"gpu_busy_ms": 60.0}}, 64) == 0.0


def test_a_dry_run_json_is_refused(scaling, tmp_path):
    """A CPU dry run's figures must never stand in for a GPU's."""
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"card": "CPU dry run", "runs": [{"name": "fp32", "images_per_s": 0.3},
                                                                  {"name": "three", "images_per_s": 0.5}]}))
    with pytest.raises(ValueError, match="CPU dry run"):
        scaling.throughput_from_gpu_check(path, {"resnet18": scaling.Throughput(1.0, 1.0, 1.0)})

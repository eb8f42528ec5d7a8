"""Every distinct stage the ImageNet and Table 1-5 presets produce trains through the engine before a
cluster pays for it: the FP32 teacher, Stage I as a teacher, bits {1,2,3,4}, activations {2,3,4} with
weights {1,3,4}, the asymmetric and round quantizers, one BN per bit-width from the Stage II model, the
Independent networks.

Each preset is shrunk with the pipeline's own `--smoke` transform and planned with the pipeline's own
planner; its architectures become resnet_tiny (the architectures themselves are built by the core's tests).
Every stage with a configuration not seen before then runs the engine's worker steps for real (model from
its predecessor's model.pt, activation calibration, a DeepSpeed engine with the stage's optimizer groups,
two training steps with its sub-net policy and teacher, the paper's evaluation) in one process with a
gloo group of one, sharing one pair of FFCV loaders: the Ray/DeepSpeed multi-worker path is the engine
module's own integration test."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch

from orchestrator.engine.checkpoint import MODEL_FILE, save_model_pt
from orchestrator.pipeline.config import load_pipeline_config
from orchestrator.pipeline.plan import build_plan
from orchestrator.pipeline.smoke import smoke_config

CONFIGS = Path(__file__).resolve().parents[2] / "pipelines" / "configs"
PRESETS = ["imagenet", "table1_no_tbn", "table2_distillation", "table3_bits_4321", "table4_ternary_binary",
           "table5_quantizers"]
VAL_BATCH = 128  # images per evaluation batch (the digits' 359 validation images in 3 batches)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    """The embedded digits, a gloo process group of one on loopback, DeepSpeed on the CPU."""
    import torch.distributed as dist

    from orchestrator.data.embedded import write_embedded_digits
    from orchestrator.engine.stage import torch_extensions_dir
    for name, value in (("DS_ACCELERATOR", "cpu"), ("LOCAL_RANK", "0"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)  # what a launcher (Ray Train) sets for DeepSpeed
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    data = tmp_path_factory.mktemp("presets") / "digits"
    write_embedded_digits(data)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield data
    finally:
        dist.destroy_process_group()


def signature(plan, node, seen_models: dict) -> tuple:
    """What makes a stage distinct: its policy, model options and the kinds of model it starts from and
    learns from (not its architecture, name or seed)."""
    model = node.config.model.model_dump(exclude={"name", "num_classes"})
    upstream = tuple(plan.nodes[k].stage + ":" + plan.nodes[k].config.model.bn if k else None
                     for k in (node.init_after, node.teacher_after))
    return (node.stage, node.config.policy.model_dump_json(exclude={"k", "ramp_epochs"}),
            repr(sorted(model.items())), upstream)


def test_every_distinct_stage_of_the_paper_presets_trains_through_the_engine(engine_env, tmp_path):
    from orchestrator.data.loaders import build_train_loader, build_val_loader
    from orchestrator.engine.worker import StageWorker

    data = engine_env
    loaders = None
    ran: dict[tuple, Path] = {}     # signature -> the model.pt it produced
    kinds = set()
    for preset in PRESETS:
        cfg = smoke_config(load_pipeline_config(CONFIGS / f"{preset}.yaml"))
        plan = build_plan(cfg, data_path=str(data), tracking_uri=f"sqlite:///{tmp_path}/unused.db")
        produced: dict[str, Path] = {}  # this plan's node key -> model.pt
        for node in plan.order():
            sig = signature(plan, node, ran)
            if sig in ran:
                produced[node.key] = ran[sig]
                continue
            stage_cfg = node.config.model_copy(update={
                "model": node.config.model.model_copy(update={"name": "resnet_tiny"}),
                "init_from": str(produced[node.init_after]) if node.init_after else None,
                "distill": node.config.distill.model_copy(update={"teacher_uri": str(produced[node.teacher_after])})
                if node.teacher_after else node.config.distill,
            })
            worker = StageWorker(stage_cfg, run_id=None, rank=0, world_size=1)
            if loaders is None:
                # The evaluation reads the validation set in batches of its own size: the smoke presets' batch
                # of 8 made it most of this test's time (top-1 at fixed bits does not depend on the batch).
                cpu = torch.device("cpu")
                loaders = (build_train_loader(stage_cfg.data, rank=0, world_size=1, device=cpu, distributed=False),
                           build_val_loader(stage_cfg.data.model_copy(update={"batch_size": VAL_BATCH}), rank=0,
                                            world_size=1, device=cpu))
            worker.build_engine(worker.prepare_model(), loaders=loaders)
            decay = sorted(g["weight_decay"] for g in worker.engine.optimizer.param_groups)
            assert decay == [0.0, stage_cfg.optim.weight_decay], decay  # no decay on the learned step sizes
            metrics = worker.train_epoch(0)
            table = worker.evaluate(0, metrics)
            where = f"{preset}: {node.key}"
            assert metrics["global_step"] == 2 and math.isfinite(metrics["train_loss"]), where
            assert (worker.teacher is not None) == (node.teacher_after is not None), where
            top1 = {k: v for k, v in metrics.items() if k.startswith("val/top1_")}
            expected = ({"val/top1_fp32"} if node.stage == "fp32"
                        else {f"val/top1_{b}bit" for b in stage_cfg.model.bits_activations})
            assert set(top1) == expected and all(0 <= v <= 100 for v in top1.values()), where
            assert table is not None
            folder = tmp_path / f"model-{len(ran)}"
            ran[sig] = produced[node.key] = save_model_pt(
                folder / MODEL_FILE, net=worker.engine.module, model_name="resnet_tiny",
                build_kwargs=stage_cfg.model.build_kwargs(), stage=stage_cfg.policy.stage, epoch=0, metrics={})
            model = stage_cfg.model
            kinds.add((node.stage, stage_cfg.policy.stage, model.bn, tuple(model.bits_weights),
                       tuple(model.bits_activations), model.symmetric, model.rounding,
                       node.teacher_after and plan.nodes[node.teacher_after].stage))
    # The configurations the presets are known to need, each trained at least once.
    stages = {k[1] for k in kinds}
    assert {"fp32", "one", "two", "three", "independent"} <= stages
    assert any(k[2] == "per_bit" and k[1] == "three" for k in kinds)               # Table 1
    assert {k[-1] for k in kinds} >= {"fp32", "one", None}                          # FP32 / Stage I / no teacher
    assert any(k[4] == (1, 2, 3, 4) for k in kinds)                                 # Table 3
    assert any(k[3] == (1, 3, 4) and k[4] == (2, 3, 4) for k in kinds)              # Table 4
    assert any(not k[5] and k[6] == "floor" for k in kinds) and any(not k[5] and k[6] == "round" for k in kinds)

"""The DeepSpeed JSON config of a stage, generated from our typed config (never written by hand)."""
from __future__ import annotations

from orchestrator.engine.config import StageConfig


def deepspeed_config(cfg: StageConfig, *, world_size: int, use_gpu: bool) -> dict:
    """ZeRO stage, micro-batch and gradient accumulation, precision, and the optimizer.

    - Per-worker batch = global // workers; one optimizer step consumes it in `grad_accumulation`
      micro-batches, so train_batch_size stays the configured global batch.
    - bf16 on GPU when asked, as torch autocast (`torch_autocast`): the weights, their gradients, the
      optimizer and the BN statistics stay float32 and convolutions run in bf16. DeepSpeed's own "bf16" mode
      (bf16 weights, float32 master copies) was measured at half the images/s of this on an H200: its
      optimizer pays several kernel launches per parameter tensor, and the meta-network had ~400 of them then
      (docs/benchmarks.md, "GPU"). fp32 on CPU (CPU bf16 kernels are slow).
    - Adam with L2 weight decay (the paper's Adam, not AdamW) as plain torch Adam: `torch_adam` keeps
      DeepSpeed from compiling FusedAdam, which needs CUDA (and ~95 s of build on a CPU machine).
    The learning-rate schedule is passed to deepspeed.initialize as a torch LambdaLR (engine/schedule.py).
    """
    accumulation = cfg.deepspeed.grad_accumulation
    per_worker = cfg.data.batch_size // world_size
    config = {
        "train_batch_size": per_worker * world_size,
        "train_micro_batch_size_per_gpu": per_worker // accumulation,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": cfg.optim.lr_peak, "weight_decay": cfg.optim.weight_decay,
                       "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True, "adam_w_mode": False},
        },
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage, **_grad_norm_setting(cfg)},
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": bool(use_gpu and cfg.deepspeed.bf16_on_gpu), "dtype": "bfloat16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # progress is ours: one line per epoch
        "wall_clock_breakdown": False,
        # Always written: DeepSpeed clips at a norm of 1.0 when the key is absent, and 0 is our "off".
        "gradient_clipping": cfg.deepspeed.gradient_clipping,
    }
    return config


def _grad_norm_setting(cfg: StageConfig) -> dict:
    """ZeRO 1 and 2 compute the global gradient norm every step by default: a vector norm per parameter tensor
    and an all-reduce, which only gradient clipping reads (nothing of ours logs it). Without clipping they skip
    it; ZeRO 0 has no such setting."""
    if cfg.deepspeed.zero_stage in (1, 2) and cfg.deepspeed.gradient_clipping == 0:
        return {"compute_grad_norm": False}
    return {}


def parameter_groups(net) -> list[dict]:
    """The trainable parameters as optimizer groups: the learned (log) step sizes without weight decay
    (decay would pull log alpha towards 0, alpha towards 1), everything else with the config's decay."""
    import bitmixer_core as core
    steps = [p for p in core.step_size_parameters(net) if p.requires_grad]
    step_ids = {id(p) for p in steps}
    others = [p for p in net.parameters() if p.requires_grad and id(p) not in step_ids]
    return [group for group in ({"params": others}, {"params": steps, "weight_decay": 0.0}) if group["params"]]

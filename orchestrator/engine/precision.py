"""The compute precision of a stage: float32, or bf16 through torch autocast (GPU engines).

Under autocast the weights, their gradients, the optimizer and the BN running statistics all stay float32;
convolutions and the FC run in bf16, and the core's BNs normalise in float32 whatever they are given."""
from __future__ import annotations

import contextlib

import torch


def compute_precision(device: torch.device | str, dtype: torch.dtype):
    """A context that computes in `dtype`: autocast for bf16, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype a stage computes in, from its DeepSpeed config: bf16 under autocast, else float32."""
    return torch.bfloat16 if ds_config["torch_autocast"]["enabled"] else torch.float32

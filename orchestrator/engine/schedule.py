"""Learning-rate schedule shared by all stages (section 5.1): linear warm-up to the peak, then a cosine to
`lr_final`, with no restarts, stepped once per optimizer step."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, *, total_steps: int, warmup_steps: int, lr_peak: float, lr_final: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warm-up: lr_peak * (step + 1) / warmup_steps, so the first step already moves (a zero lr would waste it)
    and step warmup_steps - 1 reaches the peak. Cosine: from lr_peak at step warmup_steps to lr_final at the
    last step (total_steps - 1).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if step < warmup_steps:
        return lr_peak * (step + 1) / warmup_steps
    decay_steps = max(total_steps - 1 - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return lr_final + 0.5 * (lr_peak - lr_final) * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, lr_peak: float,
                  lr_final: float = 0.0, last_step: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_at` (the optimizer's base lr must be lr_peak; DeepSpeed steps it with the
    optimizer and saves it in its checkpoint)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_peak
        group.setdefault("initial_lr", lr_peak)
    factor = lambda step: lr_at(step, total_steps=total_steps, warmup_steps=warmup_steps,  # noqa: E731
                                lr_peak=lr_peak, lr_final=lr_final) / lr_peak
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_step)

"""One optimizer step of Bit-Mixer training on a DeepSpeed engine: draw the step's sub-net (the same on
every rank), then forward/backward each micro-batch with CE + KD from the frozen teacher."""
from __future__ import annotations

import torch

import bitmixer_core as core
from orchestrator.engine.config import DistillConfig
from orchestrator.engine.precision import compute_precision
from orchestrator.engine.subnets import SubnetSampler


def train_step(engine, images: torch.Tensor, labels: torch.Tensor, *, sampler: SubnetSampler, global_step: int,
               epoch: float, accumulation: int, distill: DistillConfig, teacher=None,
               dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """Returns (sum of per-image losses, images) for the epoch's mean loss. DeepSpeed steps the optimizer
    and the LR schedule once `accumulation` micro-batches have gone backward. `dtype` is the compute dtype:
    bf16 when the engine autocasts its forward, which the teacher's forward then does too."""
    sampler.apply(global_step, epoch)
    loss_sum, count = 0.0, 0
    for part_images, part_labels in zip(images.chunk(accumulation), labels.chunk(accumulation)):
        logits = engine(part_images)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad(), compute_precision(part_images.device, dtype):
                teacher_logits = teacher(part_images).float()
        loss = core.distillation_loss(logits.float(), teacher_logits, part_labels,
                                      temperature=distill.temperature, weight=distill.weight)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.item() * part_labels.numel()
        count += part_labels.numel()
    return loss_sum, count

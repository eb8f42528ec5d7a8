"""Knowledge distillation from a frozen teacher (FP32 network or the Stage I network)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    weight: float = 1.0,
) -> torch.Tensor:
    """CE(student, targets) + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The T^2 factor keeps the soft term's gradient scale independent of T (Hinton et al., 2015). The KL is
    averaged over the batch; the teacher's logits are detached. With no teacher this is plain CE."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}.")
    ce = F.cross_entropy(student_logits, targets)
    if teacher_logits is None or weight == 0:
        return ce
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return ce + weight * t * t * kl

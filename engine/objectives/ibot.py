"""iBOT masked-patch cross-entropy (DINOv2 patch term, spec 4.2). Positive, unlike the reference fallback."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_2d, compute_dtype, full_precision
from .simdinov2 import check_patch_weights


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    weights: torch.Tensor,
    n_global_crops: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """L_ibot = (1 / n_global_crops) * sum_j w_j * (-sum_k q[j,k] log softmax(a_j / student_temp)_k).

    student_patch_logits, teacher_patch_probs: (M, K) at the masked patches (teacher detached);
    weights (M,); n_global_crops = 2*B (unmasked crops count in the denominator).
    """
    fn = "ibot_patch_loss"
    check_2d("student_patch_logits", fn, student_patch_logits)
    check_2d("teacher_patch_probs", fn, teacher_patch_probs)
    if student_patch_logits.shape != teacher_patch_probs.shape:
        raise ValueError(
            f"{fn}: student_patch_logits {tuple(student_patch_logits.shape)} and teacher_patch_probs "
            f"{tuple(teacher_patch_probs.shape)} must have the same shape (M, K)"
        )
    check_patch_weights(fn, weights, student_patch_logits.shape[0], n_global_crops)
    if not student_temp > 0:
        raise ValueError(f"{fn}: 'student_temp' must be > 0, got {student_temp!r}")
    with full_precision(student_patch_logits):
        dtype = compute_dtype(student_patch_logits, teacher_patch_probs, weights)
        log_p = F.log_softmax(student_patch_logits.to(dtype) / student_temp, dim=-1)
        cross_entropy = -(teacher_patch_probs.detach().to(dtype) * log_p).sum(-1)
        return (weights.to(dtype) * cross_entropy).sum() / n_global_crops

"""SimDINOv2 loss: SimDINO on CLS tokens + negative cosine on masked patches (spec 3.4-3.6)."""
from __future__ import annotations

import torch

from ._common import check_2d, compute_dtype, cosine_normalize, full_precision
from .simdino import simdino_terms


def check_patch_weights(fn: str, weights: torch.Tensor, n_patches: int, n_global_crops: int) -> None:
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.shape[0] != n_patches:
        raise ValueError(
            f"{fn}: 'weights' must be a 1-D tensor with one weight per masked patch ({n_patches}), "
            f"got {tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__}"
        )
    if not isinstance(n_global_crops, int) or n_global_crops < 1:
        raise ValueError(f"{fn}: 'n_global_crops' must be an int >= 1, got {n_global_crops!r}")


def cosine_patch_loss(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    weights: torch.Tensor,
    n_global_crops: int,
) -> torch.Tensor:
    """L_patch = -(1 / n_global_crops) * sum_j w_j cos(t_j, s_j) (spec 3.5; negative).

    student_patch, teacher_patch: (M, p) head outputs at the M masked patches (teacher detached).
    weights: (M,), 1 / (number of masked patches of that patch's crop).
    n_global_crops: 2*B, the total number of global crops; unmasked crops count too (T13).
    """
    fn = "cosine_patch_loss"
    check_2d("student_patch", fn, student_patch)
    check_2d("teacher_patch", fn, teacher_patch)
    if student_patch.shape != teacher_patch.shape:
        raise ValueError(
            f"{fn}: student_patch {tuple(student_patch.shape)} and teacher_patch "
            f"{tuple(teacher_patch.shape)} must have the same shape (M, p)"
        )
    check_patch_weights(fn, weights, student_patch.shape[0], n_global_crops)
    with full_precision(student_patch):
        dtype = compute_dtype(student_patch, teacher_patch, weights)
        s = cosine_normalize(student_patch.to(dtype))
        t = cosine_normalize(teacher_patch.detach().to(dtype))
        cos = (s * t).sum(-1)
        return -(weights.to(dtype) * cos).sum() / n_global_crops


def simdinov2_loss(
    student_cls: torch.Tensor,
    teacher_cls: torch.Tensor,
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    patch_weights: torch.Tensor,
    n_crops: int,
    eps: float = 0.05,
    coeff: float = 1.0,
    expa_type: int = 1,
    world_size: int = 1,
    dino_weight: float = 1.0,
    ibot_weight: float = 1.0,
    reduce_cov: bool = False,
    virtual_ranks: int = 1,
    *,
    debug: bool | None = None,
    coding_rate_fn=None,
) -> dict:
    """SimDINOv2 objective (spec 3.6): total = dino_weight * L_cls + ibot_weight * L_patch.

    student_cls (V*B, p) crop-major, teacher_cls (2*B, p); student_patch / teacher_patch (M, p)
    at the masked patches, patch_weights (M,). Returns a dict with the spec's logged keys:
    total_loss, dino_mcr_loss, dino_mcr_comp_loss, dino_mcr_global_comp_loss (logging only:
    (C[0,1] + C[1,0]) / 2, detached), dino_mcr_expa_loss, ibot_comp_loss.
    Virtual ranks need no care in the patch term: the mean over groups of their 1/(2B/k)-scaled
    sums equals the 1/(2B)-scaled sum over the whole batch.
    coding_rate_fn: optional coding-rate implementation (see ``simdino_terms``).
    """
    comp, expa, pair_cos = simdino_terms(
        student_cls, teacher_cls, n_crops, eps, expa_type, world_size, reduce_cov, virtual_ranks,
        debug=debug, fn="simdinov2_loss", names=("student_cls", "teacher_cls"), coding_rate_fn=coding_rate_fn,
    )
    dino_loss = -coeff * comp - expa
    ibot = cosine_patch_loss(student_patch, teacher_patch, patch_weights, teacher_cls.shape[0])
    return {
        "total_loss": dino_weight * dino_loss + ibot_weight * ibot,
        "dino_mcr_loss": dino_loss,
        "dino_mcr_comp_loss": comp,
        "dino_mcr_global_comp_loss": ((pair_cos[0, 1] + pair_cos[1, 0]) / 2).detach(),
        "dino_mcr_expa_loss": expa,
        "ibot_comp_loss": ibot,
    }

"""DINO centering ops with the signatures and semantics of ``flashdino.engine.objectives``:
``dino_loss`` (teacher softmax centering + cross-entropy + center update, fused) and
``dino_cross_entropy`` (given teacher probabilities, e.g. from Sinkhorn-Knopp)."""
from __future__ import annotations

import torch

from flashdino.engine.distributed import all_reduce_sum_

from .triton_dino import dino_ce_triton


def _check_views(fn, student_logits, teacher, n_crops, teacher_name):
    for name, t in (("student_logits", student_logits), (teacher_name, teacher)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{fn}: '{name}' must be a 2-D floating-point tensor (rows, K), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(n_crops, int) or n_crops < 2:
        raise ValueError(f"{fn}: 'n_crops' must be an int >= 2 (two global crops first), got {n_crops!r}")
    rows, n_protos = student_logits.shape
    if n_protos < 1:
        raise ValueError(f"{fn}: student_logits has no prototype column (shape {tuple(student_logits.shape)})")
    if rows == 0 or rows % n_crops:
        raise ValueError(f"{fn}: student_logits has {rows} rows, not a positive multiple of n_crops={n_crops} "
                         "(expected crop-major (n_crops * B, K))")
    batch = rows // n_crops
    if teacher.shape != (2 * batch, n_protos):
        raise ValueError(f"{fn}: '{teacher_name}' has shape {tuple(teacher.shape)}; student_logits "
                         f"{tuple(student_logits.shape)} with n_crops={n_crops} needs (2 * {batch}, {n_protos})")
    return batch, n_protos


def _is64(*tensors):
    return any(t.dtype == torch.float64 for t in tensors)


def dino_loss_fused(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor, n_crops: int,
                    student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9):
    """DINO loss with the current center, and the updated center (spec 4.1). Returns (loss, new_center).

    student_logits (V*B, K), teacher_logits (2*B, K), center (K,) or (1, K). The center's batch
    mean is all-reduced over the process group (SUM of row sums and row counts).
    """
    fn = "dino_loss"
    # Triton takes scalars; the trainer passes the teacher temperature as a 0-d CPU tensor
    student_temp, teacher_temp = float(student_temp), float(teacher_temp)
    batch, n_protos = _check_views(fn, student_logits, teacher_logits, n_crops, "teacher_logits")
    if not isinstance(center, torch.Tensor) or center.numel() != n_protos or center.shape[-1] != n_protos:
        raise ValueError(f"{fn}: 'center' must have shape (K,) or (1, K) with K={n_protos} prototypes, got "
                         f"{tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__}")
    if not student_temp > 0 or not teacher_temp > 0:
        raise ValueError(f"{fn}: temperatures must be > 0, got student_temp={student_temp!r}, "
                         f"teacher_temp={teacher_temp!r}")
    if not 0.0 <= center_momentum <= 1.0:
        raise ValueError(f"{fn}: 'center_momentum' must be in [0, 1], got {center_momentum!r}")
    if _is64(student_logits, teacher_logits, center):
        from flashdino.engine.objectives import dino_loss

        return dino_loss(student_logits, teacher_logits, center, n_crops, student_temp, teacher_temp, center_momentum)
    loss, row_sum = dino_ce_triton(student_logits, teacher_logits, center, n_crops, student_temp, teacher_temp, 0)
    with torch.no_grad():
        stats = torch.cat([row_sum, row_sum.new_full((1,), float(teacher_logits.shape[0]))])
        all_reduce_sum_(stats)
        batch_mean = stats[:-1] / stats[-1]
        new_center = center_momentum * center.float() + (1.0 - center_momentum) * batch_mean.reshape(center.shape)
    return loss, new_center


def dino_cross_entropy_fused(student_logits: torch.Tensor, teacher_probs: torch.Tensor, n_crops: int,
                             student_temp: float = 0.1) -> torch.Tensor:
    """Mean over the 2V−2 cross-view pairs of the batch-mean soft cross-entropy (spec 4.1)."""
    fn = "dino_cross_entropy"
    _check_views(fn, student_logits, teacher_probs, n_crops, "teacher_probs")
    student_temp = float(student_temp)  # a scalar for Triton (the eager op accepts a 0-d tensor too)
    if not student_temp > 0:
        raise ValueError(f"{fn}: 'student_temp' must be > 0, got {student_temp!r}")
    if _is64(student_logits, teacher_probs):
        from flashdino.engine.objectives import dino_cross_entropy

        return dino_cross_entropy(student_logits, teacher_probs, n_crops, student_temp)
    loss, _ = dino_ce_triton(student_logits, teacher_probs, None, n_crops, student_temp, 1.0, 1)
    return loss

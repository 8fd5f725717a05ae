"""DINO cross-entropy with teacher centering and sharpening (spec 4.1; CLS term of DINOv2, 4.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flashdino.engine.distributed import all_reduce_sum_

from ._common import check_2d, compute_dtype, full_precision, same_view_mask, split_crop_major


def _check_center(fn: str, center: torch.Tensor, n_protos: int) -> None:
    if not isinstance(center, torch.Tensor) or center.numel() != n_protos or center.shape[-1] != n_protos:
        raise ValueError(
            f"{fn}: 'center' must have shape (K,) or (1, K) with K={n_protos} prototypes, got "
            f"{tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__}"
        )


@torch.no_grad()
def softmax_center_teacher(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """q = softmax((u - c) / teacher_temp) over prototypes, fp32, no gradient. (rows, K) -> (rows, K)."""
    fn = "softmax_center_teacher"
    check_2d("teacher_logits", fn, teacher_logits)
    _check_center(fn, center, teacher_logits.shape[1])
    # Skipped while compiling: a Python comparison on the value would make dynamo specialize on it
    # (one recompile per temperature of the warmup schedule).
    if not torch.compiler.is_compiling() and not teacher_temp > 0:
        raise ValueError(f"{fn}: 'teacher_temp' must be > 0, got {teacher_temp!r}")
    with full_precision(teacher_logits):
        dtype = compute_dtype(teacher_logits, center)
        centered = teacher_logits.to(dtype) - center.to(dtype).reshape(1, -1)
        return F.softmax(centered / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """c_new = momentum * c + (1 - momentum) * mean of the teacher rows of all ranks. Returns a new tensor.

    The row sums and the row count are summed over ranks in one all-reduce, so the mean is over all
    rows of all ranks (equal to the spec's 1/(N*2B) when every rank has 2B rows). ``center`` is
    not modified; the result has its shape and the compute dtype (fp32, or float64).
    """
    fn = "update_center"
    check_2d("teacher_logits", fn, teacher_logits)
    _check_center(fn, center, teacher_logits.shape[1])
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{fn}: 'momentum' must be in [0, 1], got {momentum!r}")
    with full_precision(teacher_logits):
        dtype = compute_dtype(teacher_logits, center)
        rows = teacher_logits.to(dtype)
        stats = torch.cat([rows.sum(0), rows.new_full((1,), rows.shape[0])])
        all_reduce_sum_(stats)
        # No host-side check of the count (it would sync every step): zero rows on every rank
        # gives a NaN center, which the trainer's finiteness check reports.
        batch_mean = stats[:-1] / stats[-1]
        return momentum * center.to(dtype) + (1.0 - momentum) * batch_mean.reshape(center.shape)


def dino_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Mean over the 2V-2 cross-view pairs of the batch-mean soft cross-entropy (spec 4.1).

    student_logits (V*B, K) crop-major; teacher_probs (2*B, K) teacher targets (detached here).
    l[g, v] = (1/B) sum_b -sum_k q[g,b,k] log softmax(a[v,b] / student_temp)_k, pairs v != g.
    """
    fn = "dino_cross_entropy"
    n_views, batch, n_protos = split_crop_major(
        fn, student_logits, teacher_probs, n_crops, names=("student_logits", "teacher_probs")
    )
    if not student_temp > 0:
        raise ValueError(f"{fn}: 'student_temp' must be > 0, got {student_temp!r}")
    with full_precision(student_logits):
        dtype = compute_dtype(student_logits, teacher_probs)
        log_p = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1).view(n_views, batch, n_protos)
        q = teacher_probs.detach().to(dtype).view(2, batch, n_protos)
        pair_ce = -torch.einsum("gbk,vbk->gv", q, log_p) / batch
        same = same_view_mask(n_views, pair_ce.device)
        return torch.where(same, torch.zeros_like(pair_ce), pair_ce).sum() / (2 * n_views - 2)


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    center_momentum: float = 0.9,
):
    """DINO loss with the *current* center, then the updated center (spec 4.1). Returns (loss, new_center).

    student_logits (V*B, K), teacher_logits (2*B, K), center (K,) or (1, K). The center update
    is all-reduced over ranks when a process group is initialised.
    """
    probs = softmax_center_teacher(teacher_logits, center, teacher_temp)
    loss = dino_cross_entropy(student_logits, probs, n_crops, student_temp)
    return loss, update_center(center, teacher_logits, center_momentum)

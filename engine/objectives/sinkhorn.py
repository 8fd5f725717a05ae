"""Sinkhorn-Knopp teacher targets (DINOv2 option, spec 4.2), fp32, distributed-aware."""
from __future__ import annotations

import torch
import torch.distributed as dist

from flashdino.engine.distributed import all_reduce_sum_, is_distributed

from ._common import check_2d, compute_dtype, full_precision


def _all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments of the rows of all ranks to the K prototypes. (rows, K) -> (rows, K).

    Q = exp(u / teacher_temp)^T (K x rows), divided by its global sum; then n_iterations times:
    each prototype row is divided by its global sum (all-reduced) and by K, each sample column
    by its local sum and by B_tot (the row count summed over ranks). Finally Q * B_tot, so each
    sample's assignment sums to 1.

    Overflow guard: the reference exponentiates u / teacher_temp directly, which overflows fp32
    once a logit exceeds 88.7 * teacher_temp (3.5 at 0.04, e.g. DINOv2's trainable prototype
    norm g > 3.5) and then returns NaN. We subtract each prototype's maximum logit over all rows of
    all ranks (an all-reduced MAX) first. That multiplies each row of Q by a constant, which the
    first prototype normalization removes exactly, so the result is mathematically unchanged. Every
    prototype row then holds a 1, so no row sum can underflow to 0. A remaining failure needs a
    sample whose logit is more than ~87 * teacher_temp below every prototype's maximum (its whole
    column underflows to 0): that sample's result is NaN, visible to the finiteness check.
    Ranks may hold different numbers of rows (also zero); every rank must call this collectively.
    """
    fn = "sinkhorn_knopp"
    check_2d("teacher_logits", fn, teacher_logits)
    if not teacher_temp > 0:
        raise ValueError(f"{fn}: 'teacher_temp' must be > 0, got {teacher_temp!r}")
    if not isinstance(n_iterations, int) or n_iterations < 0:
        raise ValueError(f"{fn}: 'n_iterations' must be an int >= 0, got {n_iterations!r}")
    with full_precision(teacher_logits):
        u = teacher_logits.to(compute_dtype(teacher_logits))
        n_rows, n_protos = u.shape
        if n_rows:
            proto_max = u.amax(dim=0)
        else:
            proto_max = u.new_full((n_protos,), float("-inf"))
        _all_reduce_max_(proto_max)
        q = torch.exp((u - proto_max) / teacher_temp).T  # (K, rows)

        # Global row count and global sum of Q share one all-reduce.
        stats = torch.stack([q.new_tensor(float(n_rows)), q.sum()])
        all_reduce_sum_(stats)
        total_rows, total_mass = stats[0], stats[1]
        q = q / total_mass
        for _ in range(n_iterations):
            proto_sums = all_reduce_sum_(q.sum(dim=1, keepdim=True))
            q = q / proto_sums / n_protos
            q = q / q.sum(dim=0, keepdim=True) / total_rows
        return (q * total_rows).T

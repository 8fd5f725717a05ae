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

    The spec's recipe: Q = exp(u / teacher_temp)^T (K x rows), divided by its global sum; then
    n_iterations times: each prototype row divided by its global sum (all-reduced) and by K, each
    sample column by its local sum and by B_tot (rows summed over ranks); finally Q * B_tot, so
    each sample's assignment sums to 1. Ranks may hold different numbers of rows (also zero);
    every rank must call this collectively.

    Overflow/underflow: the reference exponentiates u / teacher_temp as is, which overflows fp32
    once a logit exceeds 88.7 * teacher_temp (3.5 at 0.04; e.g. DINOv2's trainable prototype norm
    g > 3.5) and returns NaN. Subtracting only a maximum is not enough either: a sample whose
    logits all lie > 87 * teacher_temp below the maxima would underflow to a zero column (0/0).
    We therefore run the identical iterations in scaling form, Q = diag(a) E diag(b), with
        E[k, j] = exp((u[j, k] - M_k) / T - c_j),   M_k = max over all rows of all ranks,
                                                    c_j = max_k (u[j, k] - M_k) / T  (<= 0)
    so E <= 1 with a 1 in every column and in every prototype row (globally): no sum can
    underflow. Each row update sets a = 1 / (K * rowsum(E b)) and each column update
    b = 1 / (B_tot * colsum(diag(a) E)), exactly the spec's normalizations; the initial global
    normalization and exp(M) are row scalings, removed exactly by the first row update, and
    exp(c) is the initial b. Everything stays in the linear domain, so fp32 accuracy is that of
    the reference formula when it does not overflow.
    """
    fn = "sinkhorn_knopp"
    check_2d("teacher_logits", fn, teacher_logits)
    # Skipped while compiling: a Python comparison on the value would make dynamo specialize on it
    # (one recompile per temperature of the warmup schedule).
    if not torch.compiler.is_compiling() and not teacher_temp > 0:
        raise ValueError(f"{fn}: 'teacher_temp' must be > 0, got {teacher_temp!r}")
    if not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"{fn}: 'n_iterations' must be an int >= 1, got {n_iterations!r}")
    with full_precision(teacher_logits):
        scores = teacher_logits.to(compute_dtype(teacher_logits)).T / teacher_temp  # (K, rows)
        n_protos, n_rows = scores.shape
        if n_rows:
            proto_max = scores.amax(dim=1, keepdim=True)
        else:
            proto_max = scores.new_full((n_protos, 1), float("-inf"))
        _all_reduce_max_(proto_max)
        shifted = scores - proto_max  # <= 0
        if n_protos:
            sample_shift = shifted.amax(dim=0, keepdim=True)  # (1, rows), <= 0
        else:
            sample_shift = shifted.new_zeros((1, n_rows))
        e = torch.exp(shifted - sample_shift)
        total_rows = all_reduce_sum_(scores.new_tensor(float(n_rows)))

        b = torch.exp(sample_shift).squeeze(0)  # (rows,)
        for _ in range(n_iterations):
            a = 1.0 / (n_protos * all_reduce_sum_(e @ b))  # prototype (row) normalization
            b = 1.0 / (total_rows * (a @ e))  # sample (column) normalization, local
        return (a[:, None] * e * b[None, :] * total_rows).T

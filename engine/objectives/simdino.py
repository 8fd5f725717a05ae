"""SimDINO loss: cosine compression over cross-view pairs + coding-rate expansion (spec 2.3-2.5)."""
from __future__ import annotations

import torch

from ._common import compute_dtype, cosine_normalize, full_precision, same_view_mask, split_crop_major
from .coding_rate import coding_rate, coding_rate_gamma


def simdino_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    n_crops: int,
    eps: float = 0.05,
    expa_type: int = 1,
    world_size: int = 1,
    reduce_cov: bool = False,
    virtual_ranks: int = 1,
    *,
    debug: bool | None = None,
    fn: str = "simdino_loss",
    names=("student", "teacher"),
    coding_rate_fn=None,
):
    """The pieces of the SimDINO loss: (comp, expa, pair_cos).

    pair_cos is the (2, V) matrix C[g, v] of batch-mean cosines between teacher global view g
    and student view v (same-view entries included; they are masked out of comp).
    coding_rate_fn: an implementation with `coding_rate`'s signature (e.g. the Triton kernel from
    ``flashdino.kernels.get_coding_rate("triton")``); default: the eager `coding_rate`.
    """
    rate_fn = coding_rate if coding_rate_fn is None else coding_rate_fn
    n_views, batch, dim = split_crop_major(fn, student, teacher, n_crops, names)
    if expa_type not in (0, 1):
        raise ValueError(f"{fn}: 'expa_type' must be 0 or 1, got {expa_type!r}")
    if not isinstance(virtual_ranks, int) or virtual_ranks < 1 or batch % virtual_ranks:
        raise ValueError(
            f"{fn}: 'virtual_ranks'={virtual_ranks!r} must be an int >= 1 that divides the batch B={batch}"
        )
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{fn}: 'world_size' must be an int >= 1, got {world_size!r}")

    with full_precision(student):
        dtype = compute_dtype(student, teacher)
        s = student.to(dtype).view(n_views, batch, dim)
        t = teacher.detach().to(dtype).view(2, batch, dim)  # the teacher is a constant target

        # Compression (2.3): every (teacher global g, student v != g) pair, each pair weighted equally.
        pair_cos = torch.einsum("gbd,vbd->gv", cosine_normalize(t), cosine_normalize(s)) / batch
        same = same_view_mask(n_views, pair_cos.device)
        comp = torch.where(same, torch.zeros_like(pair_cos), pair_cos).sum() / (2 * n_views - 2)

        # Expansion (2.4): global views only. Type 1 averages with the (constant) teacher and is
        # deliberately not re-normalized (T6).
        z = s[:2] if expa_type == 0 else (s[:2] + t) / 2
        gamma = coding_rate_gamma(dim, batch, world_size)
        if virtual_ranks == 1 or reduce_cov:
            # With reduce_cov every (virtual) rank sees the same global covariance and alpha/gamma only
            # depend on N*B, so splitting into virtual ranks would change nothing.
            rates = rate_fn(z, eps, world_size, reduce_cov, debug=debug)
        else:
            # T4: emulate world_size*k ranks of B/k images. Contiguous chunks of B/k images form a
            # group; alpha and gamma are unchanged (they depend on N*B only) but each group gets
            # its own covariance. Mean over the 2k (view, group) rates = mean over groups of
            # (R_0 + R_1)/2.
            k = virtual_ranks
            rates = rate_fn(z.reshape(2 * k, batch // k, dim), eps, world_size * k, debug=debug)
        expa = gamma * rates.mean()
    return comp, expa, pair_cos


def simdino_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    n_crops: int,
    eps: float = 0.05,
    coeff: float = 1.0,
    expa_type: int = 1,
    world_size: int = 1,
    reduce_cov: bool = False,
    virtual_ranks: int = 1,
    *,
    debug: bool | None = None,
):
    """SimDINO objective, spec 2.5: loss = -coeff * comp - expa. Returns (loss, comp, expa).

    student: (V*B, p) crop-major head outputs (views 0, 1 global, then the local views).
    teacher: (2*B, p) teacher head outputs of the two global views; detached here.
    eps: coding-rate precision (alpha = p / (B * world_size * eps)).
    expa_type: 0 -> Z_g = s_g; 1 -> Z_g = (s_g + t_g) / 2 (reference default).
    world_size: N in alpha and gamma (counts even without reduce_cov, spec T4).
    reduce_cov: sum each global view's covariance over the process group (see ``coding_rate``).
    virtual_ranks: k > 1 splits the local batch into k groups of B/k whose expansion terms are
    computed as if they were separate ranks (world size N*k) and averaged, so one process at batch
    N*B with virtual_ranks=N reproduces N ranks at batch B (T4). Ignored (exactly equivalent)
    with reduce_cov.
    All three outputs are fp32 0-d tensors (float64 for float64 inputs) and carry the graph.
    """
    comp, expa, _ = simdino_terms(
        student, teacher, n_crops, eps, expa_type, world_size, reduce_cov, virtual_ranks, debug=debug
    )
    loss = -coeff * comp - expa
    return loss, comp, expa

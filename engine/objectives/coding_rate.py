"""Coding rate R(Z) = 1/2 logdet(I + alpha Z^T Z) (spec section 2.4, traps T1-T4, T15).

Failure policy (spec T2): ``torch.linalg.cholesky_ex`` never raises. A factorization that
fails (``info != 0``, which for finite inputs cannot happen because I + alpha*Sigma is positive
definite; it happens with NaN/Inf features or overflow) makes the result NaN, on device and
without a host sync, so the trainer's finiteness check sees it. With ``debug=True`` (or the
environment variable ``FLASHDINO_DEBUG=1``) the info is read on the host and a failure raises
``FloatingPointError`` naming the views that failed.
"""
from __future__ import annotations

import os

import torch

from flashdino.engine.distributed import all_reduce_sum_differentiable, get_rank, get_world_size

from ._common import compute_dtype, full_precision


def debug_checks_enabled(debug: bool | None = None) -> bool:
    """Explicit argument wins; otherwise FLASHDINO_DEBUG=1 turns the host-syncing checks on."""
    if debug is not None:
        return bool(debug)
    return os.environ.get("FLASHDINO_DEBUG", "0") not in ("", "0", "false", "False")


def coding_rate_alpha(dim: int, batch: int, world_size: int, eps: float) -> float:
    """alpha = p / (B * N * eps); N is the world size even without covariance reduction (T4)."""
    return dim / (batch * world_size * eps)


def coding_rate_gamma(dim: int, batch: int, world_size: int) -> float:
    """gamma = (p + N*B) / (p * N * B) = 1/p + 1/(N*B), the expansion term's balancing factor."""
    rows = batch * world_size
    return (dim + rows) / (dim * rows)


class _HalfLogdetSPD(torch.autograd.Function):
    """(R, info) with R = 1/2 logdet(M) = sum(log(diag(chol(M)))) for symmetric positive-definite M.

    Backward: dR/dM = 1/2 M^-1 = 1/2 cholesky_inverse(L), one step from the saved factor. In fp32
    this is measurably more accurate than differentiating through the Cholesky factor (its error
    is ~kappa(M) * 6e-8 with kappa <= 1 + alpha * B), and the gradient is exactly symmetric.
    """

    @staticmethod
    def forward(ctx, matrix):
        chol, info = torch.linalg.cholesky_ex(matrix)
        ctx.save_for_backward(chol)
        ctx.mark_non_differentiable(info)
        return chol.diagonal(dim1=-2, dim2=-1).log().sum(-1), info

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_half_logdet, _grad_info):
        (chol,) = ctx.saved_tensors
        return 0.5 * grad_half_logdet[..., None, None] * torch.cholesky_inverse(chol)


def _gather_rows(z: torch.Tensor) -> torch.Tensor:
    """(G, B, p) local rows -> (G, N*B, p) rows of all ranks in rank order, differentiably.

    Built from the differentiable SUM all-reduce of a zero-padded tensor: rank r's rows sit in
    slot r, so the sum is the concatenation (adding zeros is exact). Its backward all-reduces the
    upstream gradient, giving the same convention as the covariance path (T15): each rank receives
    N times the gradient of the global R with respect to its own rows.
    """
    n, r = get_world_size(), get_rank()
    g, b, p = z.shape
    before = z.new_zeros(g, r * b, p)
    after = z.new_zeros(g, (n - 1 - r) * b, p)
    return all_reduce_sum_differentiable(torch.cat([before, z, after], dim=1))


def coding_rate(
    z: torch.Tensor,
    eps: float,
    world_size: int = 1,
    reduce_cov: bool = False,
    *,
    debug: bool | None = None,
) -> torch.Tensor:
    """R = 1/2 logdet(I_p + alpha Z^T Z) with alpha = p / (B * world_size * eps).

    z: (B, p) or batched (G, B, p) (one matrix per view). Returns a 0-d tensor or (G,).
    Computed in fp32 (float64 for float64 input) with autocast off (T1), via a Cholesky log-det.
    The smaller of the B x B Gram and the p x p covariance is factorized (Sylvester, T3).

    reduce_cov: the covariance is summed over all ranks of the process group (which must have
    ``world_size`` ranks) with a differentiable SUM all-reduce. When N*B < p the rows of all ranks
    are gathered instead (a Gram matrix cannot be summed across ranks). Gradient convention
    (T15): every rank computes the same global R and receives N x dR/dZ_local for its own rows;
    DDP's gradient averaging then yields the true gradient of R.
    """
    fn = "coding_rate"
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"{fn}: 'z' must be a floating-point tensor, got {getattr(z, 'dtype', type(z))}")
    if z.dim() not in (2, 3):
        raise ValueError(f"{fn}: 'z' must be (B, p) or (G, B, p), got shape {tuple(z.shape)}")
    batch, dim = z.shape[-2:]
    if batch == 0 or dim == 0:
        raise ValueError(f"{fn}: 'z' has an empty batch or feature dim, shape {tuple(z.shape)}")
    if not eps > 0:
        raise ValueError(f"{fn}: 'eps' must be > 0, got {eps!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{fn}: 'world_size' must be an int >= 1, got {world_size!r}")
    if reduce_cov and world_size != get_world_size():
        raise ValueError(
            f"{fn}: reduce_cov=True sums the covariance over the process group, which has "
            f"{get_world_size()} rank(s), but world_size={world_size} was passed; they must match"
        )

    alpha = coding_rate_alpha(dim, batch, world_size, eps)
    with full_precision(z):
        zs = z.to(compute_dtype(z))
        if zs.dim() == 2:
            zs = zs.unsqueeze(0)
        if reduce_cov and world_size > 1 and batch * world_size < dim:
            rows = _gather_rows(zs)
            gram = rows @ rows.mT  # (G, N*B, N*B)
        elif reduce_cov and world_size > 1:
            gram = all_reduce_sum_differentiable(zs.mT @ zs)  # (G, p, p)
        elif batch < dim:
            gram = zs @ zs.mT  # (G, B, B): same log-det, cheaper (T3)
        else:
            gram = zs.mT @ zs  # (G, p, p)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        half_logdet, info = _HalfLogdetSPD.apply(eye + alpha * gram)
        failed = info != 0
        if debug_checks_enabled(debug) and bool(failed.any()):
            raise FloatingPointError(
                f"{fn}: Cholesky of I + alpha*Sigma failed for view(s) "
                f"{failed.nonzero().flatten().tolist()} (info={info.tolist()}); the features contain "
                "NaN/Inf or overflow (max |z| = "
                f"{zs.detach().abs().nan_to_num(nan=float('inf')).max().item():.3g})"
            )
        half_logdet = torch.where(failed, torch.full_like(half_logdet, float("nan")), half_logdet)
    return half_logdet[0] if z.dim() == 2 else half_logdet

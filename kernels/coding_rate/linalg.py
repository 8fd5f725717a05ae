"""cuSOLVER (``torch.linalg``) path of the coding rate, with a hand-written backward.

Used when the Gram/covariance side is too large for the register kernel, for float64, and for
the all-reduced covariance. The backward never differentiates through the Cholesky: it applies
M⁻¹ with ``cholesky_solve`` on the saved factor (∂R/∂Z = α M⁻¹ Z, Gram form, or α Z M⁻¹).
"""
from __future__ import annotations

import torch


def _factor(m: torch.Tensor):
    chol, info = torch.linalg.cholesky_ex(m)
    half_logdet = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    # Spec T2: a failed factorization (only possible with NaN/Inf features) gives NaN, on device.
    half_logdet = torch.where(info != 0, torch.full_like(half_logdet, float("nan")), half_logdet)
    return chol, half_logdet


class _CodingRateLinalg(torch.autograd.Function):
    """(G, B, p) -> (G,) rates via the smaller of the Gram and covariance matrices."""

    @staticmethod
    def forward(ctx, z, alpha):
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
            zc = z.to(dtype)
            gram = zc.shape[1] < zc.shape[2]
            s = zc @ zc.mT if gram else zc.mT @ zc
            eye = torch.eye(s.shape[-1], dtype=dtype, device=z.device)
            chol, rate = _factor(eye + alpha * s)
        ctx.save_for_backward(zc, chol)
        ctx.alpha, ctx.gram, ctx.z_dtype = alpha, gram, z.dtype
        return rate

    @staticmethod
    def backward(ctx, grad_rate):
        zc, chol = ctx.saved_tensors
        with torch.autocast(device_type=zc.device.type, enabled=False):
            if ctx.gram:
                g = torch.cholesky_solve(zc, chol)  # M⁻¹ Z
            else:
                g = torch.cholesky_solve(zc.mT, chol).mT  # (M⁻¹ Zᵀ)ᵀ = Z M⁻¹ (M symmetric)
            g = g * (ctx.alpha * grad_rate.to(g.dtype))[:, None, None]
        return g.to(ctx.z_dtype), None


class _HalfLogdetSPD(torch.autograd.Function):
    """½ log det M for batched SPD M (G, n, n); ∂/∂M = ½ M⁻¹ (symmetric)."""

    @staticmethod
    def forward(ctx, m):
        chol, rate = _factor(m)
        ctx.save_for_backward(chol)
        return rate

    @staticmethod
    def backward(ctx, grad_rate):
        (chol,) = ctx.saved_tensors
        return 0.5 * torch.cholesky_inverse(chol) * grad_rate[:, None, None]


def coding_rate_linalg_rows(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """R_g = ½ log det(I + α Z_gᵀ Z_g) for z (G, B, p) with torch.linalg (any size, fp32 or float64)."""
    return _CodingRateLinalg.apply(z, alpha)


def half_logdet_spd(m: torch.Tensor) -> torch.Tensor:
    return _HalfLogdetSPD.apply(m)

"""Fused coding rate R = ½ log det(I + α ZᵀZ) and its gradient, one Triton program per view.

Design (sizes that matter: B = 64 rows, p = 256, 2 views):
* The smaller of the B×B Gram ``I + α Z Zᵀ`` and the p×p covariance ``I + α ZᵀZ`` (same log-det,
  Sylvester) is built in registers with fp32 ``tl.dot`` (IEEE, no TF32) from any input dtype.
* The matrix (n ≤ 128) is inverted in registers with the symmetric *sweep operator*
  (Gauss-Jordan without pivoting, stable for SPD matrices, whose pivots are positive): the
  product of the pivots is the determinant, so one loop of n rank-1 updates gives both
  log det M and M⁻¹ — no triangular solves, no second kernel.
* The gradient ∂R/∂Z = α M⁻¹ Z (Gram) or α Z M⁻¹ (covariance) is written in the same launch
  when Z needs a gradient; the backward is then a scale by the incoming gradient.
* Larger n goes to cuSOLVER through ``torch.linalg`` (``coding_rate_linalg``): a register-resident
  factorization of a 256×256 matrix in one program would be latency-bound (see issue #5).

No NaN on rank-deficient Z: M has every eigenvalue ≥ 1. NaN/Inf features give a NaN rate.
"""
from __future__ import annotations

import torch

from .._common import check_triton_tensors, new_output, next_pow2, triton, tl

# Largest Gram/covariance side handled in registers. Above it: torch.linalg (cuSOLVER).
TRITON_MAX_N = 128

if triton is not None:

    @triton.jit
    def _load_z(z_base, y_base, offs, mask, HAS_Y: tl.constexpr):
        z = tl.load(z_base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Y:  # SimDINO expa_type 1: Z = (s + t) / 2, formed in registers
            z = (z + tl.load(y_base + offs, mask=mask, other=0.0).to(tl.float32)) * 0.5
        return z

    @triton.jit
    def _coding_rate_kernel(z_ptr, y_ptr, s_g, s_r, s_c, y_g, n_rows, n_cols, alpha, grad_scale, rate_ptr,
                            grad_ptr, HAS_Y: tl.constexpr, GRAM: tl.constexpr, WITH_GRAD: tl.constexpr,
                            NPAD: tl.constexpr, BLOCK_K: tl.constexpr):
        # View g of Z: (n_rows, n_cols) with strides (s_r, s_c); with HAS_Y, Z = (z + y) / 2 where y
        # has the same row/column strides. GRAM: M = I + α Z Zᵀ (n = n_rows), else M = I + α ZᵀZ
        # (n = n_cols); the contraction runs over the other dimension in BLOCK_K chunks.
        # The gradient written is grad_scale · ∂R/∂Z (grad_scale = ½ for Z = (s + t) / 2 w.r.t. s).
        g = tl.program_id(0).to(tl.int64)
        base = z_ptr + g * s_g
        ybase = y_ptr + g * y_g
        idx = tl.arange(0, NPAD)
        kk = tl.arange(0, BLOCK_K)
        if GRAM:
            n = n_rows
            n_k = n_cols
        else:
            n = n_cols
            n_k = n_rows
        acc = tl.zeros((NPAD, NPAD), dtype=tl.float32)
        for k0 in range(0, n_k, BLOCK_K):
            kc = k0 + kk
            if GRAM:  # tile (NPAD rows, BLOCK_K features)
                offs = idx[:, None] * s_r + kc[None, :] * s_c
                tile = _load_z(base, ybase, offs, (idx[:, None] < n) & (kc[None, :] < n_k), HAS_Y)
                acc += tl.dot(tile, tl.trans(tile), input_precision="ieee")
            else:  # tile (BLOCK_K rows, NPAD features)
                offs = kc[:, None] * s_r + idx[None, :] * s_c
                tile = _load_z(base, ybase, offs, (kc[:, None] < n_k) & (idx[None, :] < n), HAS_Y)
                acc += tl.dot(tl.trans(tile), tile, input_precision="ieee")
        is_row = idx[:, None]
        is_col = idx[None, :]
        a = alpha * acc + tl.where(is_row == is_col, 1.0, 0.0)
        # Sweep every pivot k < n. Padding rows/cols (≥ n) hold the identity and are never swept;
        # they meet the swept block only through zeros.
        logdet = tl.zeros((), dtype=tl.float32)
        for piv in range(0, n):
            row = tl.sum(tl.where(is_row == piv, a, 0.0), axis=0)  # row piv (= column piv: symmetric)
            d = tl.sum(tl.where(idx == piv, row, 0.0), axis=0)
            logdet += tl.log(d)
            inv_d = 1.0 / d
            r = row[None, :]
            c = row[:, None]
            upd = a - (c * r) * inv_d
            upd = tl.where(is_row == piv, r * inv_d, upd)
            upd = tl.where(is_col == piv, c * inv_d, upd)
            a = tl.where((is_row == piv) & (is_col == piv), -inv_d, upd)
        tl.store(rate_ptr + g, 0.5 * logdet)
        if WITH_GRAD:
            m_inv = -(alpha * grad_scale) * a  # the sweep leaves −M⁻¹ (padding meets only zeros)
            gbase = grad_ptr + g * n_rows * n_cols  # gradient: contiguous (G, n_rows, n_cols)
            for k0 in range(0, n_k, BLOCK_K):
                kc = k0 + kk
                if GRAM:
                    mask = (idx[:, None] < n) & (kc[None, :] < n_k)
                    tile = _load_z(base, ybase, idx[:, None] * s_r + kc[None, :] * s_c, mask, HAS_Y)
                    out = tl.dot(m_inv, tile, input_precision="ieee")
                    tl.store(gbase + idx[:, None] * n_cols + kc[None, :], out, mask=mask)
                else:
                    mask = (kc[:, None] < n_k) & (idx[None, :] < n)
                    tile = _load_z(base, ybase, kc[:, None] * s_r + idx[None, :] * s_c, mask, HAS_Y)
                    out = tl.dot(tile, m_inv, input_precision="ieee")
                    tl.store(gbase + kc[:, None] * n_cols + idx[None, :], out, mask=mask)


def launch_config(npad: int) -> dict:
    """Warps and contraction chunk per padded size. From ptxas on sm_90 (``python -m
    flashdino.kernels.compile_check``): no register spills up to 64; 128 (16 warps, at the
    128-register cap) fits with triton 3.8 and spills 4 bytes with triton 3.6."""
    return {"num_warps": {16: 4, 32: 4, 64: 8}.get(npad, 16), "BLOCK_K": 16}


def _launch(z: torch.Tensor, y: torch.Tensor | None, alpha: float, grad_scale: float, with_grad: bool):
    g, b, p = z.shape
    if y is not None and (y.shape != z.shape or y.stride()[1:] != z.stride()[1:]):
        raise ValueError(f"coding_rate (triton): second operand shape {tuple(y.shape)} / strides {y.stride()} "
                         f"must match z {tuple(z.shape)} / {z.stride()} in the last two dims")
    gram = b < p
    n = min(b, p)
    npad = max(16, next_pow2(n))
    rate = new_output((g,), torch.float32, z.device)
    grad = new_output((g, b, p) if with_grad else (1,), torch.float32, z.device)
    cfg = launch_config(npad)
    _coding_rate_kernel[(g,)](z, y if y is not None else z, z.stride(0), z.stride(1), z.stride(2),
                              y.stride(0) if y is not None else 0, b, p, float(alpha), float(grad_scale), rate,
                              grad, HAS_Y=y is not None, GRAM=gram, WITH_GRAD=with_grad, NPAD=npad, **cfg)
    return rate, grad


class _CodingRateTriton(torch.autograd.Function):
    """(G, B, p) -> (G,) rates of Z = z or (z + y) / 2 (y constant). The gradient w.r.t. z is
    computed in the forward launch and saved; the backward only scales it."""

    @staticmethod
    def forward(ctx, z, y, alpha):
        with_grad = ctx.needs_input_grad[0]
        rate, grad = _launch(z, y, alpha, 0.5 if y is not None else 1.0, with_grad)
        if with_grad:
            ctx.save_for_backward(grad)
        ctx.z_dtype = z.dtype
        return rate

    @staticmethod
    def backward(ctx, grad_rate):
        (grad,) = ctx.saved_tensors
        return (grad * grad_rate.to(torch.float32)[:, None, None]).to(ctx.z_dtype), None, None


def coding_rate_triton_rows(z: torch.Tensor, alpha: float, y: torch.Tensor | None = None) -> torch.Tensor:
    """R_g = ½ log det(I + α Z_gᵀ Z_g) for Z = z (or (z + y) / 2, y without gradient) of shape
    (G, B, p), fp32/fp16/bf16, min(B, p) ≤ TRITON_MAX_N."""
    check_triton_tensors("coding_rate (triton)", [z] + ([y] if y is not None else []))
    if min(z.shape[1:]) > TRITON_MAX_N:
        raise ValueError(f"coding_rate (triton): min(B, p) = {min(z.shape[1:])} exceeds the register "
                         f"kernel's limit {TRITON_MAX_N}; use the torch.linalg path")
    return _CodingRateTriton.apply(z, y.detach() if y is not None else None, alpha)

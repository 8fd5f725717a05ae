"""Sinkhorn-Knopp teacher targets (spec 4.2) with the matrix kept in factored form.

Every Sinkhorn step only rescales prototypes (rows of Q = Eᵀ) or samples (its columns), so
after any number of steps Q[k, r] = E[r, k]·a_k·b_r. We use the shifted kernel

    E[r, k] = exp(x[r,k] − m_k − c_r),  x = u/τ,  m_k = max_r x[r,k] (all rows of all ranks),
                                         c_r = max_k (x[r,k] − m_k) ≤ 0,

so E ≤ 1 with a 1 in every prototype row and in every sample column: no sum can overflow or
underflow (the reference's exp(u/τ) overflows once u/τ > 88.7). The shifts are diagonal
scalings; the first prototype normalization removes m_k and the initial global sum, and c_r is
carried by the initial b_r = exp(c_r). Each step is then one pass over the logits:

    a_k ← 1 / (K · Σ_r E[r,k] b_r)        (sum all-reduced over ranks)
    b_r ← 1 / (B_tot · Σ_k E[r,k] a_k)
    P[r, k] = B_tot · E[r,k] · a_k · b_r   (written once, at the end)

The first prototype pass also finds m_k (online max-rescaled sums) and the first sample pass
c_r, so n iterations read the logits 2n times and write P once. fp32 accumulation;
collectives on K-vectors only. Same semantics as the eager ``sinkhorn_knopp`` (n_iterations ≥ 1).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from flashdino.engine.distributed import all_reduce_sum_, is_distributed

from .._common import check_triton_tensors, new_output, triton, tl

BLOCK_K = 256
BLOCK_R = 16

if triton is not None:

    @triton.jit
    def _proto_stats_kernel(u_ptr, stride_u, n_rows, n_protos, inv_tau, max_ptr, sum_ptr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # Per prototype k: m_k = max_r x[r,k] and Σ_r exp(x[r,k] − m_k), x = u/τ, in one pass.
        offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs < n_protos
        rr = tl.arange(0, BLOCK_R)
        run_max = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + rr
            m2 = (rows < n_rows)[:, None] & kmask[None, :]
            x = tl.load(u_ptr + tl.cast(rows, tl.int64)[:, None] * stride_u + offs[None, :], mask=m2,
                        other=float("-inf")).to(tl.float32) * inv_tau
            new_max = tl.maximum(run_max, tl.max(x, axis=0))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(x - safe[None, :]), axis=0)
            run_max = new_max
        tl.store(max_ptr + offs, run_max, mask=kmask)
        tl.store(sum_ptr + offs, run_sum, mask=kmask)

    @triton.jit
    def _proto_pass_kernel(u_ptr, stride_u, n_rows, n_protos, inv_tau, m_ptr, c_ptr, b_ptr, out_ptr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        # out_k = Σ_r E[r,k] b_r
        offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs < n_protos
        m = tl.load(m_ptr + offs, mask=kmask, other=0.0)
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for r0 in range(0, n_rows, BLOCK_R):
            rows = r0 + rr
            rmask = rows < n_rows
            m2 = rmask[:, None] & kmask[None, :]
            x = tl.load(u_ptr + tl.cast(rows, tl.int64)[:, None] * stride_u + offs[None, :], mask=m2,
                        other=0.0).to(tl.float32) * inv_tau
            c = tl.load(c_ptr + rows, mask=rmask, other=0.0)
            b = tl.load(b_ptr + rows, mask=rmask, other=0.0)
            arg = tl.where(m2, x - m[None, :] - c[:, None], float("-inf"))  # ≤ 0; padding: exp → 0
            acc += tl.sum(tl.exp(arg) * b[:, None], axis=0)
        tl.store(out_ptr + offs, acc, mask=kmask)

    @triton.jit
    def _sample_pass_kernel(u_ptr, stride_u, n_protos, inv_tau, m_ptr, a_ptr, btot_ptr, c_ptr, b_out_ptr,
                            FIRST: tl.constexpr, BLOCK_K: tl.constexpr):
        # b_r = 1 / (B_tot · Σ_k E[r,k] a_k), one program per row. FIRST: also find c_r (online).
        r = tl.program_id(0)
        kk = tl.arange(0, BLOCK_K)
        row = u_ptr + tl.cast(r, tl.int64) * stride_u
        lane_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if FIRST:
            lane_max = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
        else:
            c = tl.load(c_ptr + r)
        for k0 in range(0, n_protos, BLOCK_K):
            offs = k0 + kk
            kmask = offs < n_protos
            x = tl.load(row + offs, mask=kmask, other=0.0).to(tl.float32) * inv_tau
            m = tl.load(m_ptr + offs, mask=kmask, other=0.0)
            a = tl.load(a_ptr + offs, mask=kmask, other=0.0)
            z = tl.where(kmask, x - m, float("-inf"))
            if FIRST:
                new_max = tl.maximum(lane_max, z)
                safe = tl.where(new_max == float("-inf"), 0.0, new_max)
                lane_sum = lane_sum * tl.exp(lane_max - safe) + tl.exp(z - safe) * a
                lane_max = new_max
            else:
                lane_sum += tl.exp(z - c) * a
        if FIRST:
            c = tl.max(lane_max, axis=0)
            lane_sum = lane_sum * tl.exp(lane_max - c)
            tl.store(c_ptr + r, c)
        tl.store(b_out_ptr + r, 1.0 / (tl.load(btot_ptr) * tl.sum(lane_sum, axis=0)))

    @triton.jit
    def _write_probs_kernel(u_ptr, stride_u, n_protos, inv_tau, m_ptr, c_ptr, a_ptr, b_ptr, btot_ptr, p_ptr,
                            BLOCK_K: tl.constexpr):
        r = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs < n_protos
        x = tl.load(u_ptr + tl.cast(r, tl.int64) * stride_u + offs, mask=kmask, other=0.0).to(tl.float32) * inv_tau
        m = tl.load(m_ptr + offs, mask=kmask, other=0.0)
        a = tl.load(a_ptr + offs, mask=kmask, other=0.0)
        scale = tl.load(btot_ptr) * tl.load(b_ptr + r)
        e = tl.exp(tl.where(kmask, x - m - tl.load(c_ptr + r), float("-inf")))
        tl.store(p_ptr + tl.cast(r, tl.int64) * n_protos + offs, e * a * scale, mask=kmask)


def _all_reduce_max_(t):
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@torch.no_grad()
def sinkhorn_knopp_fused(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignments (rows, K) -> (rows, K), fp32; same semantics as the eager
    ``sinkhorn_knopp`` (distributed-aware: every rank must call it)."""
    fn = "sinkhorn_knopp"
    teacher_temp = float(teacher_temp)  # Triton takes a scalar; the trainer may pass a 0-d CPU tensor
    u = teacher_logits
    if not isinstance(u, torch.Tensor) or u.dim() != 2 or not u.is_floating_point():
        raise ValueError(f"{fn}: 'teacher_logits' must be a 2-D floating-point tensor (rows, K), got "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    if not teacher_temp > 0:
        raise ValueError(f"{fn}: 'teacher_temp' must be > 0, got {teacher_temp!r}")
    if not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"{fn}: 'n_iterations' must be an int >= 1, got {n_iterations!r}")
    if u.dtype == torch.float64:
        from flashdino.engine.objectives import sinkhorn_knopp

        return sinkhorn_knopp(u, teacher_temp, n_iterations)
    check_triton_tensors(fn, [u])
    u = u.detach()
    u = u if u.stride(1) == 1 else u.contiguous()
    n_rows, n_protos = u.shape
    dev, f32 = u.device, torch.float32
    inv_tau = 1.0 / teacher_temp
    n_kb = -(-n_protos // BLOCK_K)

    local_max = new_output((n_protos,), f32, dev)
    local_sum = new_output((n_protos,), f32, dev)
    if n_rows:
        _proto_stats_kernel[(n_kb,)](u, u.stride(0), n_rows, n_protos, inv_tau, local_max, local_sum,
                                     BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4)
    else:
        local_max.fill_(float("-inf"))
        local_sum.zero_()
    proto_max = _all_reduce_max_(local_max.clone())
    # Σ_r E[r,k]·b_r with the initial b_r = exp(c_r): rescale each rank's sums to the global max.
    first = local_sum * torch.exp(torch.where(local_sum > 0, local_max - proto_max, torch.zeros_like(local_max)))
    stats = torch.cat([first, first.new_full((1,), float(n_rows))])
    all_reduce_sum_(stats)
    col, btot = stats[:-1], stats[-1:]
    shift = new_output((max(n_rows, 1),), f32, dev)  # c_r
    b = None
    for it in range(n_iterations):
        if it > 0:
            col = new_output((n_protos,), f32, dev)
            if n_rows:
                _proto_pass_kernel[(n_kb,)](u, u.stride(0), n_rows, n_protos, inv_tau, proto_max, shift, b, col,
                                            BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4)
            else:
                col.zero_()
            all_reduce_sum_(col)
        a = 1.0 / (n_protos * col)
        if n_rows:
            b = new_output((n_rows,), f32, dev)
            _sample_pass_kernel[(n_rows,)](u, u.stride(0), n_protos, inv_tau, proto_max, a, btot, shift, b,
                                           FIRST=it == 0, BLOCK_K=4 * BLOCK_K, num_warps=8)
    probs = new_output((n_rows, n_protos), f32, dev)
    if n_rows:
        _write_probs_kernel[(n_rows, n_kb)](u, u.stride(0), n_protos, inv_tau, proto_max, shift, a, b, btot, probs,
                                            BLOCK_K=BLOCK_K, num_warps=4)
    return probs

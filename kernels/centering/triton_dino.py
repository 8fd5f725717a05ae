"""Fused DINO cross-entropy with teacher centering (spec 4.1), forward and backward.

    q[g,b]  = softmax((u[g,b] − c) / τ_t)                      (or given probabilities, mode 1)
    L       = 1/((2V−2)·B) Σ_b Σ_g Σ_{v≠g} CE(q[g,b], softmax(a[v,b] / τ_s))
    CE(q,y) = lse(y)·Σq − ⟨q, y⟩                                (y = a / τ_s)

Nothing of size (rows × K) is materialized in the forward: K is cut into blocks; a program
owns one block and walks the batch, computing per row the block's max and exp-sum (student
and teacher) and the dots ⟨e_g, y_v⟩ of the un-normalized teacher block with every student
view, as a (views × BLOCK_K) tile. A small combine kernel merges the blocks (online-softmax
rescaling) into the loss per image and the log-sum-exps the backward needs. The same program
sums the teacher rows for the center update, so the teacher is read once.
The backward recomputes q once per (image, block) and writes ∂L/∂a for all views: reads
student + teacher once, writes the gradient once. Accumulation is fp32 throughout.
"""
from __future__ import annotations

import torch

from .._common import check_triton_tensors, new_output, next_pow2, triton, tl

BLOCK_K = 256

if triton is not None:

    @triton.jit
    def _teacher_block(t_ptr, c_ptr, b, batch, stride_t, offs, mask, inv_tau_t, MODE: tl.constexpr):
        u0 = tl.load(t_ptr + tl.cast(b, tl.int64) * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
        u1 = tl.load(t_ptr + tl.cast(batch + b, tl.int64) * stride_t + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x0 = tl.where(mask, (u0 - c) * inv_tau_t, float("-inf"))
            x1 = tl.where(mask, (u1 - c) * inv_tau_t, float("-inf"))
        else:
            x0 = u0
            x1 = u1
        return u0, u1, x0, x1

    @triton.jit
    def _dino_fwd_kernel(s_ptr, t_ptr, c_ptr, spart_ptr, tpart_ptr, csum_ptr, n_views, batch, n_protos,
                         stride_s, stride_t, inv_tau_s, inv_tau_t, b_per_prog,
                         MODE: tl.constexpr, VPAD: tl.constexpr, BLOCK_K: tl.constexpr):
        kb = tl.program_id(0)
        bs = tl.program_id(1)
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = offs < n_protos
        vs = tl.arange(0, VPAD)
        vmask = vs < n_views
        tile_mask = vmask[:, None] & mask[None, :]
        csum = tl.zeros((BLOCK_K,), dtype=tl.float32)
        b_end = tl.minimum(bs * b_per_prog + b_per_prog, batch)
        for b in range(bs * b_per_prog, b_end):
            u0, u1, x0, x1 = _teacher_block(t_ptr, c_ptr, b, batch, stride_t, offs, mask, inv_tau_t, MODE)
            tp = tpart_ptr + tl.cast((kb * batch + b) * 4, tl.int64)
            if MODE == 0:
                csum += u0 + u1
                m0 = tl.max(x0, axis=0)
                m1 = tl.max(x1, axis=0)
                q0 = tl.exp(x0 - m0)  # masked lanes: exp(−inf) = 0
                q1 = tl.exp(x1 - m1)
                tl.store(tp, m0)
                tl.store(tp + 1, tl.sum(q0, axis=0))
                tl.store(tp + 2, m1)
                tl.store(tp + 3, tl.sum(q1, axis=0))
            else:
                q0 = x0
                q1 = x1
                tl.store(tp, tl.sum(q0, axis=0))
                tl.store(tp + 1, 0.0)
                tl.store(tp + 2, tl.sum(q1, axis=0))
                tl.store(tp + 3, 0.0)
            rows = (vs * batch + b).to(tl.int64) * stride_s
            a = tl.load(s_ptr + rows[:, None] + offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            y = a * inv_tau_s
            ym = tl.where(tile_mask, y, float("-inf"))
            ms = tl.where(vmask, tl.max(ym, axis=1), 0.0)  # padded views: 0, not −inf − −inf
            ls = tl.sum(tl.exp(ym - ms[:, None]), axis=1)
            d0 = tl.sum(y * q0[None, :], axis=1)
            d1 = tl.sum(y * q1[None, :], axis=1)
            sp = spart_ptr + tl.cast((kb * batch + b) * 4 * VPAD, tl.int64) + vs
            tl.store(sp, ms)
            tl.store(sp + VPAD, ls)
            tl.store(sp + 2 * VPAD, d0)
            tl.store(sp + 3 * VPAD, d1)
        if MODE == 0:
            tl.store(csum_ptr + tl.cast(bs, tl.int64) * n_protos + offs, csum, mask=mask)

    @triton.jit
    def _dino_combine_kernel(spart_ptr, tpart_ptr, loss_ptr, lse_s_ptr, lse_t_ptr, qsum_ptr, n_kb, n_views,
                             batch, MODE: tl.constexpr, VPAD: tl.constexpr, KBPAD: tl.constexpr):
        b = tl.program_id(0)
        kbs = tl.arange(0, KBPAD)
        kmask = kbs < n_kb
        vs = tl.arange(0, VPAD)
        vmask = vs < n_views
        tp = tpart_ptr + (kbs * batch + b).to(tl.int64) * 4
        if MODE == 0:
            # Teacher softmax normalizer over all blocks: q = e · exp(m_block − M) / L.
            m0 = tl.load(tp, mask=kmask, other=float("-inf"))
            m1 = tl.load(tp + 2, mask=kmask, other=float("-inf"))
            big0 = tl.max(m0, axis=0)
            big1 = tl.max(m1, axis=0)
            w0 = tl.exp(m0 - big0)
            w1 = tl.exp(m1 - big1)
            l0 = tl.sum(tl.load(tp + 1, mask=kmask, other=0.0) * w0, axis=0)
            l1 = tl.sum(tl.load(tp + 3, mask=kmask, other=0.0) * w1, axis=0)
            tl.store(lse_t_ptr + b, big0 + tl.log(l0))
            tl.store(lse_t_ptr + batch + b, big1 + tl.log(l1))
            w0 = w0 / l0
            w1 = w1 / l1
            qs0 = 1.0
            qs1 = 1.0
        else:
            w0 = tl.where(kmask, 1.0, 0.0)
            w1 = w0
            qs0 = tl.sum(tl.load(tp, mask=kmask, other=0.0), axis=0)
            qs1 = tl.sum(tl.load(tp + 2, mask=kmask, other=0.0), axis=0)
        tl.store(qsum_ptr + b, qs0)
        tl.store(qsum_ptr + batch + b, qs1)
        tile = (kbs * batch + b).to(tl.int64)[:, None] * (4 * VPAD) + vs[None, :]
        tmask = kmask[:, None] & vmask[None, :]
        ms = tl.load(spart_ptr + tile, mask=tmask, other=float("-inf"))
        big = tl.where(vmask, tl.max(ms, axis=0), 0.0)
        ls = tl.sum(tl.load(spart_ptr + tile + VPAD, mask=tmask, other=0.0) * tl.exp(ms - big[None, :]), axis=0)
        lse = big + tl.log(tl.where(vmask, ls, 1.0))
        tl.store(lse_s_ptr + vs * batch + b, lse, mask=vmask)
        d0 = tl.sum(tl.load(spart_ptr + tile + 2 * VPAD, mask=tmask, other=0.0) * w0[:, None], axis=0)
        d1 = tl.sum(tl.load(spart_ptr + tile + 3 * VPAD, mask=tmask, other=0.0) * w1[:, None], axis=0)
        # Pairs (g, v) with v ≠ g: view 0 pairs only with teacher 1, view 1 only with teacher 0.
        ce = tl.where(vs != 0, lse * qs0 - d0, 0.0) + tl.where(vs != 1, lse * qs1 - d1, 0.0)
        tl.store(loss_ptr + b, tl.sum(tl.where(vmask, ce, 0.0), axis=0))

    @triton.jit
    def _dino_bwd_kernel(s_ptr, t_ptr, c_ptr, lse_s_ptr, lse_t_ptr, qsum_ptr, go_ptr, grad_ptr, n_views, batch,
                         n_protos, stride_s, stride_t, inv_tau_s, inv_tau_t, scale,
                         MODE: tl.constexpr, VPAD: tl.constexpr, BLOCK_K: tl.constexpr):
        b = tl.program_id(0)
        kb = tl.program_id(1)
        offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = offs < n_protos
        vs = tl.arange(0, VPAD)
        vmask = vs < n_views
        tile_mask = vmask[:, None] & mask[None, :]
        u0, u1, x0, x1 = _teacher_block(t_ptr, c_ptr, b, batch, stride_t, offs, mask, inv_tau_t, MODE)
        if MODE == 0:
            q0 = tl.exp(x0 - tl.load(lse_t_ptr + b))
            q1 = tl.exp(x1 - tl.load(lse_t_ptr + batch + b))
        else:
            q0 = x0
            q1 = x1
        qs0 = tl.load(qsum_ptr + b)
        qs1 = tl.load(qsum_ptr + batch + b)
        coef = tl.load(go_ptr).to(tl.float32) * scale * inv_tau_s
        rows = (vs * batch + b).to(tl.int64) * stride_s
        a = tl.load(s_ptr + rows[:, None] + offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_s_ptr + vs * batch + b, mask=vmask, other=0.0)
        p = tl.exp(a * inv_tau_s - lse[:, None])
        w0 = tl.where(vs != 0, 1.0, 0.0)
        w1 = tl.where(vs != 1, 1.0, 0.0)
        gy = (w0 * qs0 + w1 * qs1)[:, None] * p - (w0[:, None] * q0[None, :] + w1[:, None] * q1[None, :])
        grad = (gy * coef).to(grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + (vs * batch + b).to(tl.int64)[:, None] * n_protos + offs[None, :], grad, mask=tile_mask)


def _b_split(n_kb: int, batch: int, device) -> int:
    """Cut the batch loop when there are too few K blocks to fill the GPU (small K)."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(batch, -(-target // n_kb)))


class _DinoCrossEntropy(torch.autograd.Function):
    """Mode 0: teacher = softmax((u − c)/τ_t) computed in-kernel, also returns Σ_rows u (center).
    Mode 1: teacher = given probabilities. Returns (loss, teacher_row_sum or None)."""

    @staticmethod
    def forward(ctx, student, teacher, center, n_views, student_temp, teacher_temp, mode):
        rows, n_protos = student.shape
        batch = rows // n_views
        device = student.device
        vpad = max(2, next_pow2(n_views))
        block_k = min(BLOCK_K, max(16, next_pow2(n_protos)))
        n_kb = -(-n_protos // block_k)
        n_bs = _b_split(n_kb, batch, device)
        b_per = -(-batch // n_bs)
        n_bs = -(-batch // b_per)
        f32 = torch.float32
        spart = new_output((n_kb, batch, 4, vpad), f32, device)
        tpart = new_output((n_kb, batch, 4), f32, device)
        csum = new_output((n_bs, n_protos), f32, device) if mode == 0 else spart
        c = center if mode == 0 else teacher
        inv_tau_s, inv_tau_t = 1.0 / student_temp, (1.0 / teacher_temp if mode == 0 else 1.0)
        _dino_fwd_kernel[(n_kb, n_bs)](student, teacher, c, spart, tpart, csum, n_views, batch, n_protos,
                                       student.stride(0), teacher.stride(0), inv_tau_s, inv_tau_t, b_per,
                                       MODE=mode, VPAD=vpad, BLOCK_K=block_k, num_warps=4)
        loss_b = new_output((batch,), f32, device)
        lse_s = new_output((n_views, batch), f32, device)
        lse_t = new_output((2, batch), f32, device) if mode == 0 else loss_b
        qsum = new_output((2, batch), f32, device)
        _dino_combine_kernel[(batch,)](spart, tpart, loss_b, lse_s, lse_t, qsum, n_kb, n_views, batch,
                                       MODE=mode, VPAD=vpad, KBPAD=max(2, next_pow2(n_kb)),
                                       num_warps=4 if n_kb <= 64 else 8)
        scale = 1.0 / ((2 * n_views - 2) * batch)
        loss = loss_b.sum() * scale
        ctx.save_for_backward(student, teacher, c, lse_s, lse_t, qsum)
        ctx.meta = (mode, n_views, batch, n_protos, inv_tau_s, inv_tau_t, scale, vpad, block_k)
        row_sum = csum.sum(0) if mode == 0 else None
        if row_sum is not None:
            ctx.mark_non_differentiable(row_sum)
        return loss, row_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_row_sum):
        student, teacher, c, lse_s, lse_t, qsum = ctx.saved_tensors
        mode, n_views, batch, n_protos, inv_tau_s, inv_tau_t, scale, vpad, block_k = ctx.meta
        grad = new_output(student.shape, student.dtype, student.device)
        go = grad_loss.detach().to(torch.float32).reshape(1)
        n_kb = -(-n_protos // block_k)
        _dino_bwd_kernel[(batch, n_kb)](student, teacher, c, lse_s, lse_t, qsum, go, grad, n_views, batch,
                                        n_protos, student.stride(0), teacher.stride(0), inv_tau_s, inv_tau_t,
                                        scale, MODE=mode, VPAD=vpad, BLOCK_K=block_k, num_warps=4)
        return grad, None, None, None, None, None, None


def dino_ce_triton(student, teacher, center, n_views, student_temp, teacher_temp, mode):
    """Launch the fused op on validated inputs. Returns (loss, teacher_row_sum | None)."""
    check_triton_tensors("dino loss (triton)", [student, teacher] + ([center] if center is not None else []))
    student = student if student.stride(1) == 1 else student.contiguous()
    teacher = teacher.detach()
    teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
    if center is not None:
        # A copy (K floats): the caller updates its center buffer in place before the backward runs.
        center = center.detach().reshape(-1).clone()
    return _DinoCrossEntropy.apply(student, teacher, center, n_views, student_temp, teacher_temp, mode)

"""SimDINO loss (spec 2.3-2.5) on the fused kernels: one compression launch, one coding-rate launch.

``simdino_loss_fused`` has the signature and semantics of ``flashdino.engine.objectives.simdino_loss``.
Both kernels write their gradient during the forward (the inputs are small: V·B·p), so the
backward is two scaled adds instead of the eager graph's few dozen launches.
"""
from __future__ import annotations

import torch

from .._common import check_triton_tensors, new_output, next_pow2, triton, tl
from .api import _debug_enabled, coding_rate_fused, rates_of_rows, validate_coding_rate_args
from .triton_cr import TRITON_MAX_N

if triton is not None:

    @triton.jit
    def _compression_kernel(s_ptr, t_ptr, n_views, batch, dim, scale, part_ptr, grad_ptr,
                            WITH_GRAD: tl.constexpr, PPAD: tl.constexpr):
        # One program per image b: teacher globals t[g, b] (g = 0, 1) against every student view
        # s[v, b]; pairs with v == g are excluded. Norms are clamped at 1e-8 (spec T9).
        # Writes scale · Σ cos into part[b] and
        # scale · ∂/∂s[v, b] of that sum.
        b = tl.program_id(0)
        offs = tl.arange(0, PPAD)
        mask = offs < dim
        t0 = tl.load(t_ptr + b * dim + offs, mask=mask, other=0.0).to(tl.float32)
        t1 = tl.load(t_ptr + (batch + b) * dim + offs, mask=mask, other=0.0).to(tl.float32)
        t0 = t0 / tl.maximum(tl.sqrt(tl.sum(t0 * t0, axis=0)), 1e-8)
        t1 = t1 / tl.maximum(tl.sqrt(tl.sum(t1 * t1, axis=0)), 1e-8)
        acc = tl.zeros((), dtype=tl.float32)
        for v in range(0, n_views):
            row = (v * batch + b).to(tl.int64) * dim
            s = tl.load(s_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
            # Teachers paired with view v: both, except the same global view.
            w0 = tl.where(v == 0, 0.0, 1.0)
            w1 = tl.where(v == 1, 0.0, 1.0)
            tv = w0 * t0 + w1 * t1
            norm = tl.sqrt(tl.sum(s * s, axis=0))
            ns = tl.maximum(norm, 1e-8)
            cos = tl.sum(tv * s, axis=0) / ns  # Σ_g cos(t_g, s_v) over the paired teachers
            acc += cos
            if WITH_GRAD:
                # ∂(<tv, s>/max(|s|, ε))/∂s = tv/ns − [|s| > ε] · cos · s / ns²
                g = tv / ns - tl.where(norm > 1e-8, cos / (ns * ns), 0.0) * s
                tl.store(grad_ptr + row + offs, scale * g, mask=mask)
        tl.store(part_ptr + b, scale * acc)


class _CompressionTriton(torch.autograd.Function):
    """comp = 1/((2V−2)·B) Σ_b Σ_g Σ_{v≠g} cos(t[g,b], s[v,b]); gradient w.r.t. the student only."""

    @staticmethod
    def forward(ctx, student, teacher, n_views):
        rows, dim = student.shape
        batch = rows // n_views
        with_grad = ctx.needs_input_grad[0]
        part = new_output((batch,), torch.float32, student.device)
        grad = new_output((rows, dim) if with_grad else (1,), torch.float32, student.device)
        scale = 1.0 / ((2 * n_views - 2) * batch)
        _compression_kernel[(batch,)](student, teacher, n_views, batch, dim, scale, part, grad,
                                      WITH_GRAD=with_grad, PPAD=max(16, next_pow2(dim)), num_warps=4)
        if with_grad:
            ctx.save_for_backward(grad)
        ctx.s_dtype = student.dtype
        return part.sum()

    @staticmethod
    def backward(ctx, grad_comp):
        (grad,) = ctx.saved_tensors
        return (grad * grad_comp.to(torch.float32)).to(ctx.s_dtype), None, None


def _check_inputs(fn, student, teacher, n_crops):
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{fn}: '{name}' must be a 2-D floating-point tensor (rows, dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(n_crops, int) or n_crops < 2:
        raise ValueError(f"{fn}: 'n_crops' must be an int >= 2 (two global crops first), got {n_crops!r}")
    if student.shape[0] % n_crops or student.shape[0] == 0:
        raise ValueError(f"{fn}: student has {student.shape[0]} rows, not a positive multiple of n_crops={n_crops}")
    batch = student.shape[0] // n_crops
    if teacher.shape[0] != 2 * batch or teacher.shape[1] != student.shape[1]:
        raise ValueError(f"{fn}: teacher shape {tuple(teacher.shape)} does not match student "
                         f"{tuple(student.shape)} with n_crops={n_crops}: expected (2 * {batch}, {student.shape[1]})")
    return batch, student.shape[1]


def simdino_loss_fused(student: torch.Tensor, teacher: torch.Tensor, n_crops: int, eps: float = 0.05,
                       coeff: float = 1.0, expa_type: int = 1, world_size: int = 1, reduce_cov: bool = False,
                       virtual_ranks: int = 1, *, debug: bool | None = None,
                       max_triton_n: int = TRITON_MAX_N):
    """loss = −coeff·comp − expa (spec 2.5); returns (loss, comp, expa), fp32 0-d tensors.

    Same arguments as the eager ``simdino_loss``; float64 inputs are handed to it.
    """
    fn = "simdino_loss"
    batch, dim = _check_inputs(fn, student, teacher, n_crops)
    if student.dtype == torch.float64 or teacher.dtype == torch.float64:
        from flashdino.engine.objectives import simdino_loss

        return simdino_loss(student, teacher, n_crops, eps, coeff, expa_type, world_size, reduce_cov,
                            virtual_ranks, debug=debug)
    if expa_type not in (0, 1):
        raise ValueError(f"{fn}: 'expa_type' must be 0 or 1, got {expa_type!r}")
    if not isinstance(virtual_ranks, int) or virtual_ranks < 1 or batch % virtual_ranks:
        raise ValueError(f"{fn}: 'virtual_ranks'={virtual_ranks!r} must be an int >= 1 that divides "
                         f"the batch B={batch}")
    validate_coding_rate_args(fn, student, eps, world_size, reduce_cov)
    check_triton_tensors(fn, [student, teacher])
    student = student.contiguous()
    teacher = teacher.detach().contiguous()  # the teacher is a constant target

    comp = _CompressionTriton.apply(student, teacher, n_crops)

    s_glob = student[: 2 * batch].view(2, batch, dim)
    t_glob = teacher.view(2, batch, dim)
    if reduce_cov and world_size > 1:
        z = s_glob.float() if expa_type == 0 else (s_glob.float() + t_glob.float()) / 2
        rates = coding_rate_fused(z, eps, world_size, reduce_cov=True, debug=debug, max_triton_n=max_triton_n)
    else:
        # Virtual ranks (spec T4): k contiguous groups of B/k images per view, each its own
        # covariance; α = p/(B·N·eps) and γ depend on N·B only, so they are unchanged. With
        # reduce_cov every group would see the same global covariance: no split (as the eager loss).
        k = 1 if reduce_cov else virtual_ranks
        zs = s_glob.reshape(2 * k, batch // k, dim)
        zt = t_glob.reshape(2 * k, batch // k, dim) if expa_type == 1 else None
        alpha = dim / (batch * world_size * eps)
        rates = rates_of_rows(zs, alpha, zt, max_triton_n=max_triton_n)
    rows = batch * world_size
    gamma = (dim + rows) / (dim * rows)
    expa = gamma * rates.mean()
    if _debug_enabled(debug) and not bool(torch.isfinite(expa)):
        raise FloatingPointError(f"{fn}: the coding rate is not finite (NaN/Inf features)")
    loss = -coeff * comp - expa
    return loss, comp, expa

"""Triton kernels for the teacher EMA and for AdamW fused with the EMA.

Both work on *pointer tables* (multi-tensor apply): a small int64 table, built once, holds
for every chunk of every parameter the addresses of its tensors and its length, so one
launch covers all parameters of a dtype combination without copying them into a flat
buffer. A flat buffer (or a ZeRO shard of one) is just a table with one tensor.

Arithmetic is fp32 whatever the storage dtype; results are rounded once on store.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .._common import check_triton_tensors, pointer_table, tl_dtype, triton, tl
from .eager import _pair_params, lerp_weight

# Elements per table row: large enough that the table stays small (ViT-L: ~5k rows),
# small enough that ViT-S still spreads over every SM.
CHUNK = 1 << 16
BLOCK = 1024


if triton is not None:

    @triton.jit
    def _lerp(a, b, w):
        # torch.lerp's two-branch formula, so results match _foreach_lerp_ to the rounding.
        return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))

    @triton.jit
    def _ema_block(t_ptr, s_ptr, offs, n, weight, T_DTYPE: tl.constexpr, MASKED: tl.constexpr):
        if MASKED:
            mask = offs < n
            t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
            s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
            tl.store(t_ptr + offs, _lerp(t, s, weight).to(T_DTYPE), mask=mask)
        else:
            t = tl.load(t_ptr + offs).to(tl.float32)
            s = tl.load(s_ptr + offs).to(tl.float32)
            tl.store(t_ptr + offs, _lerp(t, s, weight).to(T_DTYPE))

    @triton.jit
    def _ema_kernel(table_ptr, weight,
                    T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        row = table_ptr + tl.program_id(0).to(tl.int64) * 3
        t_ptr = tl.load(row).to(tl.pointer_type(T_DTYPE))
        s_ptr = tl.load(row + 1).to(tl.pointer_type(S_DTYPE))
        n = tl.load(row + 2).to(tl.int32)
        if ALIGNED:
            t_ptr = tl.multiple_of(t_ptr, 16)
            s_ptr = tl.multiple_of(s_ptr, 16)
        # Full blocks without a mask (the length comes from memory, so a masked access could not
        # be vectorized), then one masked tail.
        n_full = n // BLOCK * BLOCK
        for start in range(0, n_full, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
            _ema_block(t_ptr, s_ptr, offs, n, weight, T_DTYPE, False)
        if n_full < n:
            _ema_block(t_ptr, s_ptr, n_full + tl.arange(0, BLOCK), n, weight, T_DTYPE, True)

    @triton.jit
    def _adamw_ema_block(p_ptr, g_ptr, m_ptr, v_ptr, t_ptr, c_ptr, offs, n, decay, lerp1, beta2,
                         one_minus_beta2, neg_step_size, bc2_sqrt, eps, ema_weight,
                         T_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr,
                         MASKED: tl.constexpr):
        if MASKED:
            mask = offs < n
        else:
            mask = None
        p = tl.load(p_ptr + offs, mask=mask)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
        # The same sequence of fp32 operations as torch's multi-tensor AdamW.
        p = p * decay
        m = _lerp(m, g, lerp1)
        v = v * beta2 + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p + neg_step_size * tl.div_rn(m, denom)
        t = _lerp(t, p, ema_weight)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        tl.store(t_ptr + offs, t.to(T_DTYPE), mask=mask)
        if HAS_COPY:
            tl.store(c_ptr + offs, p.to(C_DTYPE), mask=mask)

    @triton.jit
    def _adamw_ema_kernel(table_ptr, decay, lerp1, beta2, one_minus_beta2, neg_step_size,
                          bc2_sqrt, eps, ema_weight,
                          G_DTYPE: tl.constexpr, T_DTYPE: tl.constexpr, C_DTYPE: tl.constexpr,
                          HAS_COPY: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        # Table row: master(fp32), grad, exp_avg(fp32), exp_avg_sq(fp32), teacher, copy, numel.
        row = table_ptr + tl.program_id(0).to(tl.int64) * 7
        p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        t_ptr = tl.load(row + 4).to(tl.pointer_type(T_DTYPE))
        c_ptr = tl.load(row + 5).to(tl.pointer_type(C_DTYPE))
        n = tl.load(row + 6).to(tl.int32)
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            t_ptr = tl.multiple_of(t_ptr, 16)
            c_ptr = tl.multiple_of(c_ptr, 16)
        n_full = n // BLOCK * BLOCK
        for start in range(0, n_full, BLOCK):
            offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
            _adamw_ema_block(p_ptr, g_ptr, m_ptr, v_ptr, t_ptr, c_ptr, offs, n, decay, lerp1, beta2,
                             one_minus_beta2, neg_step_size, bc2_sqrt, eps, ema_weight,
                             T_DTYPE, C_DTYPE, HAS_COPY, False)
        if n_full < n:
            _adamw_ema_block(p_ptr, g_ptr, m_ptr, v_ptr, t_ptr, c_ptr, n_full + tl.arange(0, BLOCK), n, decay,
                             lerp1, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, ema_weight,
                             T_DTYPE, C_DTYPE, HAS_COPY, True)


def _check_contiguous(what: str, name: str, tensors) -> None:
    for i, t in enumerate(tensors):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{what}: {name} tensor {i} (shape {tuple(t.shape)}) is not contiguous")


def launch_ema(table: torch.Tensor, aligned: bool, weight: float, t_dtype, s_dtype) -> None:
    if table.shape[0] == 0:
        return
    _ema_kernel[(table.shape[0],)](table, weight, T_DTYPE=tl_dtype(t_dtype), S_DTYPE=tl_dtype(s_dtype),
                                   ALIGNED=aligned, BLOCK=BLOCK, num_warps=4)


class TritonEMAUpdater:
    """θ_teacher ← m·θ_teacher + (1−m)·θ_student: one launch per (teacher, student) dtype pair.

    Pointer tables are built at construction and rebuilt (and counted in ``rebuilds``) if a
    parameter's storage, dtype or size changes, so replacing ``param.data`` (``module.half()``) is
    safe, just slower once.
    """

    name = "triton"

    def __init__(self, teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor]):
        self._teacher, self._student = list(teacher_params), list(student_params)
        self.rebuilds = 0
        self._build()

    def _signature(self):
        # The kernel's element types come from the groups: a dtype change must regroup, not only
        # re-point (it would read fp16 memory as fp32).
        return tuple((x.data_ptr(), x.dtype, x.numel()) for x in (*self._teacher, *self._student))

    def _build(self):
        """Validate the pairs and group them by dtypes: at construction, and again whenever a
        parameter's storage, dtype or size changed (its ``.data`` replaced)."""
        what = "TritonEMAUpdater"
        teacher, student = _pair_params(self._teacher, self._student, what)
        check_triton_tensors(what, teacher + student)
        _check_contiguous(what, "teacher", teacher)
        _check_contiguous(what, "student", student)
        groups = defaultdict(lambda: ([], []))
        for t, s in zip(self._teacher, self._student):
            groups[(t.device, t.dtype, s.dtype)][0].append(t)
            groups[(t.device, t.dtype, s.dtype)][1].append(s)
        self._groups = dict(groups)
        self.numel = sum(t.numel() for t in self._teacher)
        self._tables = {key: pointer_table([ts, ss], CHUNK, key[0]) for key, (ts, ss) in self._groups.items()}
        self._sig = self._signature()

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        weight = lerp_weight(momentum)
        if self._signature() != self._sig:
            self.rebuilds += 1
            self._build()
        for key, (table, aligned) in self._tables.items():
            launch_ema(table, aligned, weight, key[1], key[2])


def adamw_scalars(lr: float, weight_decay: float, beta1: float, beta2: float, eps: float, step: int,
                  momentum: float) -> dict:
    """Host-side scalars of one AdamW+EMA step, computed in Python floats as torch does."""
    if step < 1:
        raise ValueError(f"AdamW step count must be >= 1 (the step being taken), got {step}")
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    return dict(decay=1 - lr * weight_decay, lerp1=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
                neg_step_size=-(lr / bc1), bc2_sqrt=bc2 ** 0.5, eps=eps, ema_weight=lerp_weight(momentum))


def launch_adamw_ema(table: torch.Tensor, aligned: bool, scalars: dict, g_dtype, t_dtype, c_dtype) -> None:
    if table.shape[0] == 0:
        return
    _adamw_ema_kernel[(table.shape[0],)](
        table, scalars["decay"], scalars["lerp1"], scalars["beta2"], scalars["one_minus_beta2"],
        scalars["neg_step_size"], scalars["bc2_sqrt"], scalars["eps"], scalars["ema_weight"],
        G_DTYPE=tl_dtype(g_dtype), T_DTYPE=tl_dtype(t_dtype),
        C_DTYPE=tl_dtype(c_dtype if c_dtype is not None else torch.float32),
        HAS_COPY=c_dtype is not None, ALIGNED=aligned, BLOCK=BLOCK, num_warps=4)


def adamw_ema_triton_(master, grad, exp_avg, exp_avg_sq, teacher, *, lr, weight_decay, betas, eps, step,
                      momentum, model_copy=None) -> None:
    """One fused AdamW + EMA step on flat tensors (see ``flashdino.kernels.ema.adamw_ema_``)."""
    what = "adamw_ema_ (triton)"
    tensors = [master, grad, exp_avg, exp_avg_sq, teacher] + ([model_copy] if model_copy is not None else [])
    check_triton_tensors(what, tensors)
    _check_contiguous(what, "flat", tensors)
    table, aligned = pointer_table([[master], [grad], [exp_avg], [exp_avg_sq], [teacher], [model_copy]],
                                   CHUNK, master.device)
    scalars = adamw_scalars(lr, weight_decay, betas[0], betas[1], eps, step, momentum)
    launch_adamw_ema(table, aligned, scalars, grad.dtype, teacher.dtype,
                     model_copy.dtype if model_copy is not None else None)

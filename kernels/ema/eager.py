"""Eager teacher EMA: ``torch._foreach_lerp_`` (the reference the Triton updater must match)."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .._common import SUPPORTED_DTYPES, check_dtype


def _pair_params(teacher_params, student_params, what: str):
    teacher = [p for p in teacher_params]
    student = [p for p in student_params]
    if len(teacher) != len(student):
        raise ValueError(f"{what}: {len(teacher)} teacher tensors but {len(student)} student tensors")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"{what}: tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if t.device != s.device:
            raise ValueError(f"{what}: tensor {i}: teacher on {t.device}, student on {s.device}")
        check_dtype(what, f"teacher tensor {i}", t, SUPPORTED_DTYPES)
        check_dtype(what, f"student tensor {i}", s, SUPPORTED_DTYPES)
    return teacher, student


def lerp_weight(momentum: float) -> float:
    """EMA θ_t ← m·θ_t + (1−m)·θ_s is a lerp from θ_t towards θ_s with weight 1 − m."""
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {m}")
    return 1.0 - m


class EagerEMAUpdater:
    """θ_teacher ← m·θ_teacher + (1−m)·θ_student with one ``_foreach_lerp_`` per dtype pair.

    Pairs whose dtypes differ (e.g. an fp16 teacher following fp32 master weights) are
    computed in fp32 and rounded once into the teacher.
    """

    name = "eager"

    def __init__(self, teacher_params: Sequence[torch.Tensor], student_params: Sequence[torch.Tensor]):
        teacher, student = _pair_params(teacher_params, student_params, "EagerEMAUpdater")
        groups = defaultdict(lambda: ([], []))
        for t, s in zip(teacher, student):
            key = (t.device, t.dtype, s.dtype)
            groups[key][0].append(t)
            groups[key][1].append(s)
        self._groups = dict(groups)
        self.numel = sum(t.numel() for t in teacher)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        weight = lerp_weight(momentum)
        for (_, t_dtype, s_dtype), (ts, ss) in self._groups.items():
            if t_dtype == s_dtype:
                torch._foreach_lerp_(ts, ss, weight)
            else:
                t32 = [t.float() for t in ts]
                torch._foreach_lerp_(t32, [s.float() for s in ss], weight)
                torch._foreach_copy_(ts, t32)

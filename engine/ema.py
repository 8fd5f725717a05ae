"""Eager teacher EMA (spec 1.7): theta_t <- m * theta_t + (1 - m) * theta_s, parameters only.

This is the reference the fused Triton updater (flashdino.kernels) is checked against.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn


def paired_parameters(teacher: nn.Module, student: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Teacher and student parameters matched by name; every teacher parameter must have a twin."""
    student_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        if name not in student_params:
            raise KeyError(f"teacher parameter '{name}' has no student counterpart")
        s = student_params[name]
        if s.shape != t.shape:
            raise ValueError(f"teacher/student shape mismatch for '{name}': {tuple(t.shape)} vs {tuple(s.shape)}")
        t_list.append(t)
        s_list.append(s)
    return t_list, s_list


class EagerEMA:
    """One `_foreach_lerp_` over all teacher parameters."""

    def __init__(self, teacher_params: List[torch.Tensor], student_params: List[torch.Tensor]):
        self.teacher = [p.data for p in teacher_params]
        self.student = [p.data for p in student_params]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        # lerp(t, s, w) = t + w (s - t) = m t + (1 - m) s with w = 1 - m
        if self.teacher[0].dtype == self.student[0].dtype:
            torch._foreach_lerp_(self.teacher, self.student, 1.0 - momentum)
        else:  # mixed-precision copies: lerp needs equal dtypes
            torch._foreach_lerp_(self.teacher, [s.to(t.dtype) for s, t in zip(self.student, self.teacher)], 1.0 - momentum)


def build_ema(kind: str, teacher: nn.Module, student: nn.Module):
    """`kind` = "eager" or "triton" (runtime.kernels.ema)."""
    t_params, s_params = paired_parameters(teacher, student)
    if kind == "eager":
        return EagerEMA(t_params, s_params)
    if kind == "triton":
        from flashdino.kernels import get_ema_updater

        return get_ema_updater("triton")(t_params, s_params)
    raise ValueError(f"unknown EMA kernel {kind!r}; valid: eager, triton")

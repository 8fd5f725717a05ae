"""Detect a non-finite loss without a host sync on every step (spec trap T12).

Each step records, on the device, whether any loss term or gradient norm (the trainer passes those
outside fp16) is NaN/inf and the first step where one was. `check()` (at log steps, before each
checkpoint, at the end, and every step on the CPU where a sync costs nothing) brings that one number
to the host and raises with the step and the term.
Since a checkpoint is only written after a successful check, the last checkpoint on disk always
holds finite weights.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .distributed import is_distributed


class NonFiniteLossError(FloatingPointError):
    def __init__(self, step: int, terms: List[str], values: Dict[str, float]):
        self.step, self.terms, self.values = step, terms, values
        shown = ", ".join(f"{k}={values[k]}" if k in values else k for k in terms)
        super().__init__(
            f"non-finite loss or gradient at step {step}: {shown}. Training stopped; the last checkpoint on disk "
            f"was written before this step and is intact."
        )


class FiniteGuard:
    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self._names: Optional[List[str]] = None
        self._first_bad_step: Optional[torch.Tensor] = None
        self._bad_values: Optional[torch.Tensor] = None

    def record(self, step: int, losses: Dict[str, torch.Tensor]) -> None:
        names = sorted(k for k, v in losses.items() if torch.is_tensor(v) and v.ndim == 0)
        values = torch.stack([losses[k].detach().float() for k in names])
        if self._names is None:
            self._names = names
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=values.device)
            self._bad_values = torch.zeros_like(values)
        bad = ~torch.isfinite(values).all()
        first = bad & (self._first_bad_step < 0)
        # Branch-free updates keep this asynchronous on the GPU.
        self._first_bad_step = torch.where(first, torch.full_like(self._first_bad_step, step), self._first_bad_step)
        self._bad_values = torch.where(first, values, self._bad_values)

    def _earliest_bad_step(self) -> int:
        """The first non-finite step of this rank, or of any rank when distributed (-1: none).

        In a multi-process run every rank joins this MIN all-reduce (check() is called at the same
        points everywhere), so a NaN seen by one rank stops all of them instead of leaving the
        others waiting in their next collective.
        """
        local = self._first_bad_step if self._first_bad_step is not None else torch.full((), -1, dtype=torch.long)
        if not is_distributed():
            return int(local.item())
        import torch.distributed as dist

        never = torch.iinfo(torch.long).max
        flag = torch.where(local < 0, never, local).to(self.device).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        step = int(flag.item())
        return -1 if step == never else step

    def check(self) -> None:
        step = self._earliest_bad_step()
        if step < 0:
            return
        if self._first_bad_step is None or int(self._first_bad_step.item()) != step:
            raise NonFiniteLossError(step, ["reported by another rank"], {})
        values = dict(zip(self._names, self._bad_values.tolist()))
        bad_terms = [k for k, v in values.items() if not torch.isfinite(torch.tensor(v))]
        # Name the component terms first (the total is non-finite because one of them is), then the
        # gradient norms (non-finite because a loss term or the backward is).
        bad_terms.sort(key=lambda k: (k.startswith("grad_norm"), k == "total_loss"))
        raise NonFiniteLossError(step, bad_terms, values)

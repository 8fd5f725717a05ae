"""Detect a non-finite loss without a host sync on every step (spec trap T12).

Each step records, on the device, whether any loss term is NaN/inf and the first step where one
was. `check()` (at log steps, before each checkpoint, at the end, and every step on the CPU where
a sync costs nothing) brings that one number to the host and raises with the step and the term.
Since a checkpoint is only written after a successful check, the last checkpoint on disk always
holds finite weights.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch


class NonFiniteLossError(FloatingPointError):
    def __init__(self, step: int, terms: List[str], values: Dict[str, float]):
        self.step, self.terms, self.values = step, terms, values
        shown = ", ".join(f"{k}={values[k]}" for k in terms)
        super().__init__(
            f"non-finite loss at step {step}: {shown}. Training stopped; the last checkpoint on disk "
            f"was written before this step and is intact."
        )


class FiniteGuard:
    def __init__(self):
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

    def check(self) -> None:
        if self._first_bad_step is None:
            return
        step = int(self._first_bad_step.item())
        if step < 0:
            return
        values = dict(zip(self._names, self._bad_values.tolist()))
        bad_terms = [k for k, v in values.items() if not torch.isfinite(torch.tensor(v))]
        # Name the component terms first: the total is non-finite because one of them is.
        bad_terms.sort(key=lambda k: k == "total_loss")
        raise NonFiniteLossError(step, bad_terms, values)

"""Fitting a run's schedule to its wall-clock budget (``train.fit_to_time`` with ``train.max_minutes``).

``train.max_minutes`` alone stops a run where the time runs out, mid-schedule: the learning rate
has not decayed and the teacher momentum has not reached its end value, which is a poor model to
evaluate. With ``train.fit_to_time=true`` the trainer instead measures its speed after the compile
warm-up (the first log window), over log windows spanning a tenth of the budget, and shortens the
schedule to the whole number of epochs that fit the budget (never lengthens it), rebuilding every
schedule (LR, weight decay, teacher momentum, ...) for the new length. The run then ends its
(shorter) schedule properly.

The steps already taken used the values of the longer schedule. During the LR warm-up the LR is the
same in both; the cosine-from-step-0 schedules (weight decay, teacher momentum) differ slightly:
:func:`past_value_drift` measures by how much, and the run records it.
"""
from __future__ import annotations

import math
from typing import Dict

# The speed is measured from the end of the first log window (compile warm-up) over whole log
# windows spanning at least this fraction of the budget.
MEASURE_FRACTION = 0.1
# Kept back from the budget for what the log window did not see: epoch ends (loader restart,
# checkpoint), the final checkpoint, and speed noise.
DEFAULT_MARGIN = 0.05


def fitted_epochs(*, planned_epochs: int, warmup_epochs: int, iters_per_epoch: int, step: int, elapsed_s: float,
                  seconds_per_step: float, budget_s: float, margin: float = DEFAULT_MARGIN) -> int:
    """Whole epochs whose steps fit `budget_s` at `seconds_per_step`, given `step` steps done in
    `elapsed_s`; at most `planned_epochs`, at least `warmup_epochs + 1` (a schedule needs an epoch
    after its warm-up; the time limit still stops a run that cannot afford even that) and at least
    the epochs already begun (a schedule never ends behind the step the run is at)."""
    if iters_per_epoch < 1 or planned_epochs < 1:
        raise ValueError(f"fitted_epochs: need iters_per_epoch >= 1 and planned_epochs >= 1, got "
                         f"{iters_per_epoch} and {planned_epochs}")
    if not (seconds_per_step > 0 and math.isfinite(seconds_per_step)):
        raise ValueError(f"fitted_epochs: seconds_per_step must be a positive number, got {seconds_per_step}")
    if not 0 <= margin < 1:
        raise ValueError(f"fitted_epochs: margin must be in [0, 1), got {margin}")
    affordable = max(budget_s * (1.0 - margin) - elapsed_s, 0.0) / seconds_per_step
    epochs = int((step + affordable) // iters_per_epoch)
    floor = max(warmup_epochs + 1, math.ceil(step / iters_per_epoch))
    return min(planned_epochs, max(epochs, floor))


def past_value_drift(old, new, steps_done: int) -> Dict[str, float]:
    """Largest |old - new| of each schedule value over the steps already taken (0 .. steps_done-1):
    how far the steps run so far are from those of a run started with the new length."""
    drift = {}
    for i in range(steps_done):
        a, b = old.values(i), new.values(i)
        for key in a:
            drift[key] = max(drift.get(key, 0.0), abs(float(a[key]) - float(b[key])))
    return drift

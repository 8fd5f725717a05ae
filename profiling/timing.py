"""Step clocks and summary statistics for the benchmarks.

A :class:`StepClock` marks the boundary between consecutive steps (a CUDA event on the GPU, so
the host never waits inside the timed loop; `time.perf_counter` on the CPU). Step i lasts from
mark i to mark i+1.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Sequence

import torch


class StepClock:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._marks: list = []
        self._wall: list = []

    def mark(self) -> None:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        self._wall.append(time.perf_counter())

    def durations_ms(self) -> List[float]:
        """Length of each step between consecutive marks (synchronizes once on CUDA)."""
        if len(self._marks) < 2:
            return []
        if self._cuda:
            self._marks[-1].synchronize()
            return [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]

    def total_s(self) -> float:
        """First mark to last mark, from the step durations (device time on CUDA)."""
        return sum(self.durations_ms()) / 1e3


def median_time_ms(fn, device, repeats: int, warmup: int = 2, before=None) -> float:
    """Median time of ``fn()`` over `repeats` calls after `warmup` untimed ones, in milliseconds:
    CUDA events around each call on the GPU (device time), perf_counter on the CPU. ``before()``,
    if given, runs ahead of every timed call, outside the timed span (e.g. an L2 cache flush)."""
    if repeats < 1:
        raise ValueError(f"median_time_ms: repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the warm-up calls must not land in the first timed call
        for _ in range(repeats):
            if before is not None:
                before()  # enqueued ahead of the start event: its GPU work is not timed
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return percentile(times, 50)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Dict[str, float]:
    """median, p10, p90, mean, min, max and n of a list of step times."""
    if not times_ms:
        raise ValueError("summarize: no step times (run at least one timed step)")
    return {
        "median": percentile(times_ms, 50),
        "p10": percentile(times_ms, 10),
        "p90": percentile(times_ms, 90),
        "mean": sum(times_ms) / len(times_ms),
        "min": min(times_ms),
        "max": max(times_ms),
        "n": len(times_ms),
    }

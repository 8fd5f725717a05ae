"""How much of a run's time goes to waiting for the next batch: the first thing to rule out when a
multi-crop run is slow (2 global + 10 local crops per image is a heavy input pipeline).

The trainer times each ``next(batches)`` on the host; per log window the waited fraction of the wall
time is logged as ``data_wait``. Past the first window (loader start, compile warm-up) a window that
waited for more than :data:`DATA_BOUND_FRACTION` of its time gets one warning per run, naming what
to change.
"""
from __future__ import annotations

from typing import Optional, Tuple

DATA_BOUND_FRACTION = 0.3


class DataWaitMonitor:
    def __init__(self, num_workers: int, pipeline: str, on_gpu: bool):
        self.num_workers, self.pipeline, self.on_gpu = num_workers, pipeline, on_gpu
        self.window_seconds = 0.0
        self.windows = 0
        self.warned = False

    def add(self, seconds: float) -> None:
        self.window_seconds += seconds

    def end_window(self, elapsed: float, steps: int) -> Tuple[float, Optional[str]]:
        """(waited fraction of the `elapsed` seconds of this window, a warning or None); starts the next window."""
        fraction = min(1.0, self.window_seconds / max(elapsed, 1e-9))
        self.window_seconds = 0.0
        self.windows += 1
        if self.warned or self.windows == 1 or fraction <= DATA_BOUND_FRACTION:
            return fraction, None
        self.warned = True
        advice = f"raise data.num_workers (now {self.num_workers})"
        if self.pipeline == "torchvision" and self.on_gpu:
            advice += ", or decode and crop on the GPU with data.pipeline=dali"
        return fraction, (f"[flashdino] warning: the last {steps} steps waited for data {fraction:.0%} of the time; "
                          f"the input pipeline limits the speed: {advice}")

"""Where training metrics go: a progress bar, a JSONL file and TensorBoard (rank 0 only)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional


class MetricsLogger:
    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, jsonl: bool = True,
                 tensorboard: bool = True, progress_bar: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self._jsonl = None
        self._tb = None
        self._bar = None
        self.tensorboard_error: Optional[str] = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step or None)
            except Exception as exc:  # tensorboard not installed: say so once, keep the JSONL
                self.tensorboard_error = f"TensorBoard logging off ({exc.__class__.__name__}: {exc})"
                print(f"[flashdino] {self.tensorboard_error}", file=sys.stderr)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step", file=sys.stderr,
                             disable=not sys.stderr.isatty() and os.environ.get("FLASHDINO_PROGRESS") != "1")

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        if self._jsonl:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            shown = {k: metrics[k] for k in ("img/s", "total_loss", "lr") if k in metrics}
            shown.update({k: v for k, v in metrics.items() if k.endswith("_loss") and k != "total_loss"})
            self._bar.set_postfix({k: _short(v) for k, v in shown.items()}, refresh=False)

    def set_total(self, total_steps: int) -> None:
        """A new length of the run (train.fit_to_time shortened its schedule)."""
        if self._bar is not None:
            self._bar.total = total_steps
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def write(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()
        self._bar = self._tb = self._jsonl = None


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def _short(value):
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return value


def read_jsonl(path: str):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]

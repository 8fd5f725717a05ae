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
            moved = supersede_records_after(self.jsonl_path, start_step)
            if moved:
                print(f"[flashdino] metrics.jsonl: {moved} line(s) of steps after {start_step}, which this run "
                      f"(re)does, moved to {os.path.basename(self.jsonl_path)}{SUPERSEDED_SUFFIX}", file=sys.stderr)
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


SUPERSEDED_SUFFIX = ".superseded"


def supersede_records_after(path: str, step: int) -> int:
    """Move the records of steps after `step` out of the JSONL file at `path`, into `path` + ".superseded".

    A run resumed at `step` redoes the steps its killed predecessor logged after its last checkpoint
    (a run started over redoes them all); without this the file would hold those steps twice, and a
    line cut mid-write by the kill would break every reader. Nothing is deleted: the moved lines are
    appended to the ".superseded" file. Returns how many lines were moved."""
    if not os.path.exists(path):
        return 0
    keep, moved = [], []
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                record_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a line cut mid-write
                record_step = None
            (keep if record_step is not None and record_step <= step else moved).append(line.rstrip("\n") + "\n")
    if not moved:
        return 0
    with open(path + SUPERSEDED_SUFFIX, "a") as fh:
        fh.writelines(moved)
        fh.flush()
        os.fsync(fh.fileno())
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.writelines(keep)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # the kept records, atomically: a kill here leaves the old file or the new
    return len(moved)


def read_jsonl(path: str):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]

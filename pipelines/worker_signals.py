"""Data-loading workers leave the stop signals to the main process.

The trainer turns SIGTERM / SIGINT / SIGUSR1 into "finish the step, checkpoint, exit"
(``flashdino.engine.stop_signals``) and then shuts its workers down itself. A Ctrl-C reaches the whole
process group, workers included; a worker that died of it would fail the main process's next batch
before the run could checkpoint. Only the standard library here: spawned DALI workers import it.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


def stop_signals() -> list:
    """The stop signals this platform has (SIGUSR1 does not exist on every one)."""
    return [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]


def ignore_stop_signals(*_worker_id) -> None:
    """Ignore the stop signals in this (worker) process. Takes (and ignores) a worker id, so that it
    serves as a DataLoader ``worker_init_fn``."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)

"""A graceful stop on SIGTERM, SIGINT (Ctrl-C) or SIGUSR1: finish the step, checkpoint, exit.

Clusters preempt a job with a signal and a grace period (SLURM sends SIGTERM and, KillWait seconds
later, SIGKILL; ``sbatch --signal=USR1@120`` sends SIGUSR1 ahead of the time limit; torchrun forwards
SIGTERM to its workers and kills them 30 s later). A run killed mid-way loses every step since its
last checkpoint. Inside :class:`StopSignals` the first such signal only records itself: the trainer
stops at the next step boundary on which every rank agrees, writes a checkpoint and exits with
128 + the signal number (the shell's convention, so that a job script sees the run did not finish).
A second signal restores the previous action and delivers itself again: the run aborts at once
(checkpoints are written atomically, so that leaves nothing half-written). The data workers ignore
these signals (``flashdino.pipelines.worker_signals``): the trainer shuts them down itself.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Dict, Optional

from flashdino.pipelines.worker_signals import stop_signals


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def exit_code(signal_name: str) -> int:
    """The shell's exit status for a process ended by `signal_name` (SIGTERM: 143, SIGINT: 130)."""
    return 128 + int(signal.Signals[signal_name])


class StopSignals:
    """Context manager that turns the first stop signal into a request (``received``).

    Installs nothing outside the main thread (Python only lets that thread set handlers); ``installed``
    says whether it did. The previous handlers are restored on exit."""

    def __init__(self, announce: Callable[[str], None] = _say):
        self.announce = announce
        self.received: Optional[str] = None  # name of the first stop signal, e.g. "SIGTERM"
        self.installed = False
        self._previous: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in stop_signals():
            # An ignored signal stays ignored: a shell starts background jobs with SIGINT ignored so
            # that a Ctrl-C meant for the foreground job does not reach them.
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @property
    def number(self) -> int:
        """The received signal's number, 0 before any (what the ranks all-reduce with MAX)."""
        return int(signal.Signals[self.received]) if self.received else 0

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            self.announce(f"[flashdino] {name} received: finishing this step, writing a checkpoint, then exiting "
                          f"(send it again to abort at once)")
            return
        self._restore()
        signal.raise_signal(signum)  # the previous action: KeyboardInterrupt for SIGINT, death for SIGTERM

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            # None: a handler installed from C, which Python cannot reinstate; the default is closest.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

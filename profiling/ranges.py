"""Named phases of a training step, marked for NVTX (Nsight Systems), torch.profiler and timers.

`phase(name)` costs one global check when profiling is off, so the engine can mark its phases
unconditionally. The bench/profile harnesses turn it on with `enable(...)`, or with a
:class:`PhaseTimer`, which adds up the time of every phase: CUDA events on the GPU (no host sync
inside the step; resolved once in `summary()`), wall clock on the CPU (where ops run synchronously).

Phases inside a `torch.compile`d region are not marked (the compiler would have to trace the
callbacks); a timer then reports that time as part of the step only.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

PHASES = ("data_wait", "h2d", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema")

_enabled = False
_on_enter: Optional[Callable[[str], None]] = None
_on_exit: Optional[Callable[[str], None]] = None


def _nvtx_push_pop():
    try:
        import nvtx  # the `nvtx` package: annotations visible in Nsight Systems

        return (lambda name: nvtx.push_range(name, domain="flashdino")), (lambda: nvtx.pop_range(domain="flashdino"))
    except ImportError:
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
        return (lambda name: None), (lambda: None)


_push, _pop = _nvtx_push_pop()


def enable(on_enter: Optional[Callable[[str], None]] = None, on_exit: Optional[Callable[[str], None]] = None) -> None:
    """Turn phase marking on; `on_enter`/`on_exit` receive the phase name (e.g. to record CUDA events)."""
    global _enabled, _on_enter, _on_exit
    _enabled, _on_enter, _on_exit = True, on_enter, on_exit


def disable() -> None:
    global _enabled, _on_enter, _on_exit
    _enabled, _on_enter, _on_exit = False, None, None


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def _marked(name: str):
    _push(name)
    if _on_enter:
        _on_enter(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if _on_exit:
            _on_exit(name)
        _pop()


_NULL = contextlib.nullcontext()


def phase(name: str):
    """Context manager marking one phase of a training step."""
    # is_compiling() first: reading `_enabled` inside a compiled region would install a guard on it,
    # and turning marking on (bench phases, profile) would then recompile the whole step.
    if torch.compiler.is_compiling() or not _enabled:
        return _NULL
    return _marked(name)


# ------------------------------------------------------------------------------------------
# per-phase timing
# ------------------------------------------------------------------------------------------


class PhaseTimer:
    """Adds up the time spent in each phase while active (``with PhaseTimer(device) as timer:``).

    On CUDA every enter/exit records an event on the current stream, so the step keeps running
    asynchronously; `summary()` synchronizes once and reads the elapsed times. On the CPU the
    clock is `time.perf_counter`. Nested phases are timed each on their own (a parent's time
    includes its children's).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        self._open: List[Tuple[str, object]] = []
        self._spans: List[Tuple[str, object, object, int]] = []  # (name, start, end, nesting depth)
        self._active = False

    def _now(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _enter(self, name: str) -> None:
        self._open.append((name, self._now()))

    def _exit(self, name: str) -> None:
        # Phases close in LIFO order; a mismatch means the marking code is broken, so say so.
        if not self._open or self._open[-1][0] != name:
            open_names = [n for n, _ in self._open]
            raise RuntimeError(f"PhaseTimer: phase '{name}' closed while {open_names} are open")
        opened_name, start = self._open.pop()
        self._spans.append((opened_name, start, self._now(), len(self._open)))

    def start(self) -> "PhaseTimer":
        if is_enabled():
            raise RuntimeError("PhaseTimer: phase marking is already enabled by someone else; stop them first")
        enable(self._enter, self._exit)
        self._active = True
        return self

    def stop(self) -> None:
        if self._active:
            disable()
            self._active = False

    def __enter__(self) -> "PhaseTimer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        self._spans.clear()

    def summary(self) -> Dict[str, Dict[str, float]]:
        """{phase: {"total_ms", "count", "mean_ms", "top_level_ms"}} over the spans recorded so far
        (PHASES order first). ``top_level_ms`` counts only spans not nested in another phase, so
        those add up to at most the wall time of the steps."""
        if self._open:
            raise RuntimeError(f"PhaseTimer: phases still open: {[n for n, _ in self._open]}")
        if self._cuda and self._spans:
            torch.cuda.synchronize(self.device)
        totals: Dict[str, List[float]] = {}
        top: Dict[str, float] = {}
        for name, start, end, depth in self._spans:
            ms = start.elapsed_time(end) if self._cuda else (end - start) * 1e3
            totals.setdefault(name, []).append(ms)
            top[name] = top.get(name, 0.0) + (ms if depth == 0 else 0.0)
        order = [p for p in PHASES if p in totals] + sorted(n for n in totals if n not in PHASES)
        return {n: {"total_ms": sum(totals[n]), "count": len(totals[n]), "mean_ms": sum(totals[n]) / len(totals[n]),
                    "top_level_ms": top[n]} for n in order}

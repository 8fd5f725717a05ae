"""Named phases of a training step, marked for NVTX (Nsight Systems), torch.profiler and timers.

`phase(name)` costs one global check when profiling is off, so the engine can mark its phases
unconditionally. The bench/profile harnesses turn it on with `enable(...)`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

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
    if not _enabled or torch.compiler.is_compiling():
        return _NULL
    return _marked(name)

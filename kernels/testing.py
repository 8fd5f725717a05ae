"""Helpers for kernel parity tests (used by tests/test_kernels_*.py and the microbenchmarks)."""
from __future__ import annotations

import numpy as np
import torch

_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float64: 2.0 ** -52}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Machine epsilon (spacing at 1.0) of ``dtype``."""
    return _EPS[dtype]


def poisoned(shape, dtype, device="cpu") -> torch.Tensor:
    """A NaN-filled tensor: any element a kernel forgets to write stays NaN and fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def guarded_views(sizes, dtype, device="cpu", guard=13, fill=None, generator=None):
    """Tensors of the given shapes carved out of one buffer with NaN guard bands between them.

    Returns (buffer, views, guard_mask). ``fill`` = None fills the views with N(0, 1) draws.
    After an in-place kernel, ``buffer[guard_mask]`` must still be all NaN: nothing was
    written out of bounds.
    """
    numels = [int(np.prod(s)) if len(s) else 1 for s in sizes]
    # Keep each view 16-byte aligned like real allocations, with a guard band before each.
    align = 16 // torch.empty((), dtype=dtype).element_size()
    offsets, off = [], 0
    for n in numels:
        off += guard
        off = (off + align - 1) // align * align
        offsets.append(off)
        off += n
    total = off + guard
    buf = torch.full((total,), float("nan"), dtype=dtype, device=device)
    guard_mask = torch.ones(total, dtype=torch.bool, device=device)
    views = []
    for s, n, o in zip(sizes, numels, offsets):
        v = buf[o:o + n].view(s)
        if fill is None:
            v.copy_(torch.randn(s, generator=generator, dtype=torch.float32).to(dtype))
        else:
            v.fill_(fill)
        guard_mask[o:o + n] = False
        views.append(v)
    return buf, views, guard_mask


def assert_guards_intact(buf: torch.Tensor, guard_mask: torch.Tensor, what: str) -> None:
    written = ~torch.isnan(buf[guard_mask])
    if written.any():
        raise AssertionError(f"{what}: {int(written.sum())} elements outside the tensors were overwritten")


def assert_close64(out: torch.Tensor, ref: np.ndarray | torch.Tensor, scale, ulps: float, what: str,
                   dtype: torch.dtype | None = None, atol: float = 0.0) -> None:
    """Every element: |out − ref| ≤ ulps · eps(dtype) · scale + atol, and out finite.

    ``ref`` is a float64 result computed independently; ``scale`` (scalar or elementwise,
    float64) is the magnitude the rounding errors are relative to (e.g. Σ|terms|).
    """
    dtype = dtype or out.dtype
    o = out.detach().double().cpu().numpy()
    r = ref.detach().double().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, np.float64)
    s = scale.detach().double().cpu().numpy() if isinstance(scale, torch.Tensor) else np.asarray(scale, np.float64)
    if o.shape != r.shape:
        raise AssertionError(f"{what}: shape {o.shape} != reference shape {r.shape}")
    if not np.isfinite(o).all():
        raise AssertionError(f"{what}: {int((~np.isfinite(o)).sum())} of {o.size} elements are not finite "
                             "(unwritten poisoned elements or overflow)")
    tol = ulps * unit_roundoff(dtype) * np.broadcast_to(s, r.shape) + atol
    err = np.abs(o - r)
    bad = err > tol
    if bad.any():
        i = np.unravel_index(np.argmax(err - tol), r.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} of {r.size} elements out of tolerance; worst at {i}: "
                             f"got {o[i]!r}, float64 reference {r[i]!r}, tolerance {tol[i]!r}")

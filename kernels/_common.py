"""Helpers shared by the Triton kernels: availability, device checks, dtype maps, pointer tables.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, read by Triton when a kernel is decorated, i.e. before this
package's kernel modules are imported). The interpreter computes bf16 arithmetic wrongly,
so CPU tests use fp32/fp16 only.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch

try:  # Triton is optional: the eager kinds work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

KINDS = ("eager", "triton")

# Dtypes the kernels read and write; arithmetic is always fp32.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton kernels execute in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_kind(kind: str, what: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"{what}: unknown kernel kind {kind!r}; choose one of {KINDS}")
    return kind


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{what}: kind 'triton' needs the triton package, which is not installed")


def check_triton_tensors(what: str, tensors: Iterable[torch.Tensor]) -> None:
    """Triton needs CUDA tensors, or CPU tensors under the interpreter; say which is missing."""
    require_triton(what)
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise RuntimeError(
            f"{what}: the Triton kernel needs CUDA tensors, got a tensor on {t.device}. "
            "On a CPU-only machine set TRITON_INTERPRET=1 before importing triton, "
            "or select the 'eager' kind."
        )


def check_dtype(what: str, name: str, t: torch.Tensor, allowed=SUPPORTED_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{what}: {name} has dtype {t.dtype}; supported: {names}")


def tl_dtype(dtype: torch.dtype):
    """The Triton element type for a torch dtype (used to type pointers loaded from tables)."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pointer_table(columns: Sequence[Sequence[torch.Tensor | None]], chunk: int,
                  device: torch.device) -> tuple[torch.Tensor, bool]:
    """Split aligned lists of same-size contiguous tensors into chunks of at most ``chunk`` elements.

    ``columns[c][i]`` is the i-th tensor of column c (None: the column is unused and gets
    address 0). Returns an int64 table with one row per chunk,
    ``(addr_col0, ..., addr_colC-1, numel)``, on ``device``, and whether every address is
    16-byte aligned (lets the kernel promise vectorizable accesses).
    A table is only valid while the tensors keep their storage (callers compare data_ptrs).
    Built with NumPy (one Python call per tensor) and copied without a host sync on CUDA.
    """
    n_cols = len(columns)
    n_tensors = len(columns[0])
    if n_tensors == 0:
        return torch.zeros((0, n_cols + 1), dtype=torch.int64, device=device), True
    numel = np.array([next(col[i] for col in columns if col[i] is not None).numel() for i in range(n_tensors)],
                     dtype=np.int64)
    n_chunks = (numel + chunk - 1) // chunk
    owner = np.repeat(np.arange(n_tensors), n_chunks)  # tensor index of every row
    first = np.concatenate([[0], np.cumsum(n_chunks)[:-1]])
    offset = (np.arange(owner.size) - first[owner]) * chunk  # element offset of the row in its tensor
    table = np.empty((owner.size, n_cols + 1), dtype=np.int64)
    aligned = True
    for c, col in enumerate(columns):
        base = np.array([t.data_ptr() if t is not None else 0 for t in col], dtype=np.int64)
        size = np.array([t.element_size() if t is not None else 0 for t in col], dtype=np.int64)
        table[:, c] = base[owner] + offset * size[owner]
        aligned &= bool((table[:, c] % 16 == 0).all())
    table[:, n_cols] = np.minimum(chunk, numel[owner] - offset)
    host = torch.from_numpy(table)
    if device.type == "cuda":
        # Pinned + non_blocking: no host sync. The caching host allocator records the copy and
        # does not hand the pinned block out again before the copy has run.
        return host.pin_memory().to(device, non_blocking=True), aligned
    return host.to(device), aligned


# Tests set this to True so every kernel output starts as NaN: an element a kernel forgets to
# write then fails the parity check instead of passing with stale memory.
POISON_OUTPUTS = False


def new_output(shape, dtype, device) -> torch.Tensor:
    """An output buffer the kernel fully overwrites (NaN-filled when POISON_OUTPUTS is set)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)

"""Attention backends: one function, ``scaled_dot_product``, behind a backend name.

All backends take and return ``(B, heads, T, head_dim)`` tensors and compute
``softmax(q k^T * scale) v`` with ``scale = head_dim ** -0.5`` unless given.

| backend      | what runs                                                                 |
|--------------|---------------------------------------------------------------------------|
| "sdpa"       | ``F.scaled_dot_product_attention``; torch picks the kernel                |
| "flash"      | the same, restricted to the FlashAttention SDPA kernel (CUDA, fp16/bf16)  |
| "cudnn"      | the same, restricted to the cuDNN SDPA kernel (CUDA, fp16/bf16)           |
| "math"       | explicit ``softmax(q k^T * scale) v`` (reference path, softmax >= fp32)   |
| "flash_attn" | ``flash_attn.flash_attn_func`` from the flash-attn package (CUDA, fp16/bf16) |
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "flash", "cudnn", "math", "flash_attn")

_FORCED_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
# Backends whose kernels exist only for fp16/bf16 CUDA tensors.
HALF_ONLY_BACKENDS = tuple(_FORCED_SDPA) + ("flash_attn",)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _unknown_backend_message(backend) -> str:
    return f"unknown attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}"


def check_backend(backend: str) -> str:
    """Return `backend` if it is a known attention backend, else raise naming the valid ones."""
    if backend not in BACKENDS:
        raise ValueError(_unknown_backend_message(backend))
    return backend


def _require_cuda_half(q: torch.Tensor, backend: str) -> None:
    # These kernels only exist for half precision on the GPU; say so instead of torch's
    # generic "No available kernel" error.
    if q.device.type != "cuda" or q.dtype not in _HALF_DTYPES:
        raise RuntimeError(
            f"attention backend {backend!r} needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}; "
            "run under autocast on a GPU, or use backend 'sdpa' (any device/dtype) or 'math'"
        )


def autocast_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v in the autocast dtype when autocast is on and they are fp32, else unchanged.

    The half-only kernels check q's dtype before any op has cast it, and flash-attn ignores
    autocast: fp32 tensors reaching them under autocast (a probe, an fp32 caller) are what autocast
    would hand a matmul, so they get the same cast.
    """
    kind = q.device.type
    if q.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def ensure_backend_available(backend: str) -> str:
    """Validate the name and, for "flash_attn", import the package now so a missing install fails
    when the model is built rather than at the first training step."""
    check_backend(backend)
    if backend == "flash_attn":
        _load_flash_attn()
    return backend


_flash_attn_func = None
_flash_attn_kind: Optional[str] = None  # what _flash_attn_func is, e.g. "FlashAttention-2 (flash-attn 2.7.4)"

_FLASH_ATTN_INSTALL_HINT = (
    "Install it with `pip install flash-attn --no-build-isolation` (a CUDA build matching your torch; "
    "FlashAttention-3 for Hopper is the `hopper/` package of the same repository), or choose "
    "runtime.attention=sdpa / flash / cudnn instead."
)


def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _fa3_adapter(fa3_func):
    # FlashAttention-3's beta interface returns (out, softmax_lse); later releases return out only.
    def flash_attn_v3(q, k, v, softmax_scale=None):
        out = fa3_func(q, k, v, softmax_scale=softmax_scale)
        return out[0] if isinstance(out, tuple) else out

    return flash_attn_v3


def _import_flash_attn():
    """(attention function, description). FlashAttention-3 on a Hopper GPU when its interface
    module is importable, else FlashAttention-2 from the flash-attn package."""
    if _is_hopper():
        try:
            from flash_attn_interface import flash_attn_func as fa3_func

            return _fa3_adapter(fa3_func), "FlashAttention-3 (flash_attn_interface)"
        except ImportError:
            pass
    import flash_attn
    from flash_attn import flash_attn_func

    return flash_attn_func, f"FlashAttention-2 (flash-attn {getattr(flash_attn, '__version__', '?')})"


def _load_flash_attn():
    global _flash_attn_func, _flash_attn_kind
    if _flash_attn_func is None:
        try:
            func, kind = _import_flash_attn()
        except ImportError as err:
            raise ImportError(
                f"attention backend 'flash_attn' needs the flash-attn package, which is not importable ({err}). "
                + _FLASH_ATTN_INSTALL_HINT
            ) from err
        _flash_attn_func, _flash_attn_kind = func, kind
    return _flash_attn_func


def flash_attn_status() -> Optional[str]:
    """Which flash-attn kernels backend 'flash_attn' would use ("FlashAttention-2 (flash-attn X)" or
    "FlashAttention-3 (...)"), or None when the package is not importable. Never raises."""
    try:
        _load_flash_attn()
    except ImportError:
        return None
    return _flash_attn_kind


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys, (B, heads, T, T); the softmax runs in at least fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    return logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)


def scaled_dot_product(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", scale: Optional[float] = None
) -> torch.Tensor:
    """Multi-head attention output for (B, heads, T, head_dim) inputs with the chosen backend."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend in _FORCED_SDPA:
        q, k, v = autocast_inputs(q, k, v)
        _require_cuda_half(q, backend)
        with sdpa_kernel(_FORCED_SDPA[backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "math":
        return attention_probs(q, k, scale) @ v
    if backend == "flash_attn":
        flash_attn_func = _load_flash_attn()
        q, k, v = autocast_inputs(q, k, v)
        _require_cuda_half(q, backend)
        # flash-attn wants (B, T, heads, head_dim); the transposes are views (last dim stays contiguous).
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    raise ValueError(_unknown_backend_message(backend))

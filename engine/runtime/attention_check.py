"""Check that the attention kernel the config asks for is the one that really runs.

PyTorch's SDPA silently picks among FlashAttention, cuDNN, memory-efficient and math kernels, and a
package import can quietly fail; a run that believes it uses FlashAttention while it runs the math
path loses most of its speed. This module runs one attention call of the model's real geometry
(heads, head dim, token count, device, dtype), records the operators it dispatches (and, on a GPU,
the kernels the profiler sees) and checks them against the request.

| requested     | accepted kernels                                              |
|---------------|---------------------------------------------------------------|
| "flash"       | SDPA FlashAttention                                            |
| "cudnn"       | SDPA cuDNN attention                                           |
| "flash_attn"  | the flash-attn package (FlashAttention-2/3)                    |
| "math"        | the explicit softmax(q k^T) v path (no fused kernel)           |
| "sdpa"        | whatever SDPA picks; reported, and an error only with `strict` |
|               | when a CUDA half-precision call falls back to the math kernel  |
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Sequence

import torch

# Operator names (as the profiler reports them) -> kernel family.
SDPA_OPS: Dict[str, str] = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu_flash",
    "aten::_scaled_dot_product_attention_math": "sdpa_math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
EXPLICIT_MATH = "explicit_math"
FLASH_ATTN = "flash_attn"
# Operator namespaces of the flash-attn packages (FlashAttention-2 >= 2.6 and -3 register torch ops).
FLASH_ATTN_NAMESPACES = ("flash_attn", "flash_attn_3", "flash_attn_interface")

ACCEPTED = {
    "flash": {"flash"},
    "cudnn": {"cudnn"},
    "flash_attn": {FLASH_ATTN},
    "math": {EXPLICIT_MATH},
}


class AttentionKernelError(RuntimeError):
    """The requested attention kernel did not run (a fallback happened, or nothing recognisable ran)."""


@dataclasses.dataclass
class AttentionKernelReport:
    requested: str
    kernels: List[str]  # kernel families seen, e.g. ["flash"]
    ops: List[str]  # the raw operator / kernel names they were read from
    device: str
    dtype: str
    shape: Sequence[int]  # (B, heads, T, head_dim) of the probe
    ok: bool

    def describe(self) -> str:
        ran = ", ".join(self.kernels) or "nothing recognisable"
        return (f"attention backend {self.requested!r} on {self.device} {self.dtype}, q shape {tuple(self.shape)}: "
                f"ran {ran} ({', '.join(self.ops) or 'no attention operator'})")


def classify_ops(names: Sequence[str]) -> Dict[str, List[str]]:
    """Kernel family -> operator names, from profiler event names."""
    found: Dict[str, List[str]] = {}
    softmax = False
    for name in sorted(set(names)):
        family = SDPA_OPS.get(name)
        if family is None and name.split("::")[0] in FLASH_ATTN_NAMESPACES:
            family = FLASH_ATTN
        if family is not None:
            found.setdefault(family, []).append(name)
        if name in ("aten::softmax", "aten::_softmax"):
            softmax = True
    # The explicit path is a plain softmax between two matmuls with no fused attention operator.
    if softmax and not found:
        found[EXPLICIT_MATH] = ["aten::softmax"]
    return found


def _dispatched_ops(fn) -> List[str]:
    """Names ("ns::op") of every operator `fn` dispatches, recorded with a dispatch mode (cheap, and
    it sees custom operators such as flash-attn's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: List[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with _Recorder() as recorder:
        fn()
    return recorder.names


def flash_attn_kernels(kernel_names: Sequence[str]) -> List[str]:
    """flash-attn package kernels among profiler kernel names. Older flash-attn releases launch their
    kernels without a torch operator, so only the kernel name shows them; PyTorch's own bundled
    FlashAttention kernels (namespace ``pytorch_flash``) are not the package. FlashAttention-2 names
    its kernels ``flash_fwd_*``; FlashAttention-3 (Hopper) ``flash::FlashAttnFwdSm90<...>``."""
    return sorted({k for k in kernel_names
                   if ("flash_fwd" in k or "FlashAttnFwd" in k) and "pytorch_flash" not in k})


def _cuda_kernel_names(fn) -> List[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()]


def _ran_families(fn, device: torch.device, backend: str) -> Dict[str, List[str]]:
    families = classify_ops(_dispatched_ops(fn))
    if backend == "flash_attn" and not families and device.type == "cuda":
        kernels = flash_attn_kernels(_cuda_kernel_names(fn))
        if kernels:
            families[FLASH_ATTN] = kernels
    return families


def probe_attention(backend: str, num_heads: int, head_dim: int, tokens: int, device, dtype: torch.dtype,
                    autocast_dtype: Optional[torch.dtype] = None, strict: bool = False) -> AttentionKernelReport:
    """Run one forward + backward of ``scaled_dot_product`` with `backend` and report what ran.

    Raises :class:`AttentionKernelError` when a forced backend (flash, cudnn, flash_attn, math) ran
    something else, and with `strict` when "sdpa" fell back to its math kernel on a CUDA half dtype."""
    from flashdino.engine.models.attention import check_backend, scaled_dot_product

    check_backend(backend)
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, num_heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def call():
        with amp:
            out = scaled_dot_product(q, k, v, backend)
        out.float().sum().backward()

    families = _ran_families(call, device, backend)
    run_dtype = autocast_dtype if (autocast_dtype and dtype == torch.float32) else dtype
    report = AttentionKernelReport(
        requested=backend,
        kernels=sorted(families),
        ops=[op for ops in families.values() for op in ops],
        device=str(device),
        dtype=str(run_dtype).replace("torch.", ""),
        shape=shape,
        ok=True,
    )
    accepted = ACCEPTED.get(backend)
    if accepted is not None:
        report.ok = bool(families) and set(families) <= accepted
    elif strict and device.type == "cuda" and run_dtype in (torch.float16, torch.bfloat16):
        report.ok = "sdpa_math" not in families
    if not report.ok:
        raise AttentionKernelError(
            f"{report.describe()}; expected {', '.join(sorted(accepted or {'a fused SDPA kernel'}))}. "
            "The run would silently use a slower kernel: fix the install / dtype / head dim, or pick another "
            "runtime.attention."
        )
    return report


def check_model_attention(backbone: torch.nn.Module, tokens: int, device, autocast_dtype: Optional[torch.dtype] = None,
                          strict: bool = False) -> AttentionKernelReport:
    """:func:`probe_attention` with a ViT backbone's backend, heads and head dim, at `tokens` tokens
    (the global crops' sequence length) and the parameters' dtype."""
    block = backbone.blocks[0]
    attn = block.attn
    dtype = next(block.parameters()).dtype
    return probe_attention(attn.backend, attn.num_heads, attn.head_dim, tokens, device, dtype,
                           autocast_dtype=autocast_dtype, strict=strict)


__all__ = ["AttentionKernelError", "AttentionKernelReport", "check_model_attention", "classify_ops", "flash_attn_kernels",
           "probe_attention"]

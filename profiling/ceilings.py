"""Device ceilings measured in the same run as the numbers they bound.

* bandwidth: a large device-to-device copy (bytes read + bytes written per second);
* FLOP rate: a large square matmul, bf16 on the GPU (plus the run's own fp32/TF32 matmul when
  training in fp32). On the CPU the matmul is fp32 (CPUs have no fast bf16 path here) and the
  result says so.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .timing import median_time_ms


def copy_bandwidth(device: torch.device, n_bytes: int, repeats: int = 10) -> Dict[str, float]:
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device, repeats)
    moved = 2 * src.numel() * 4  # read + write
    del src, dst
    return {"bytes": moved, "time_ms": ms, "gbps": moved / ms / 1e6}


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> Dict[str, float]:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_time_ms(lambda: a @ b, device, repeats)
    del a, b
    return {"shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), "time_ms": ms, "tflops": 2 * n ** 3 / ms / 1e9}


def measure_ceilings(device: torch.device, precision: str = "bf16", copy_bytes: Optional[int] = None,
                     matmul_n: Optional[int] = None, repeats: int = 10) -> Dict[str, object]:
    """Copy bandwidth and matmul FLOP rate on `device`; sizes default to 1 GiB / 8192 on the GPU
    and 64 MiB / 1024 on the CPU."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    copy_bytes = copy_bytes or ((1 << 30) if cuda else (64 << 20))
    matmul_n = matmul_n or (8192 if cuda else 1024)
    out: Dict[str, object] = {"copy": copy_bandwidth(device, copy_bytes, repeats)}
    if cuda:
        out["matmul_bf16"] = matmul_rate(device, matmul_n, torch.bfloat16, repeats)
        if precision == "fp16":
            out["matmul_fp16"] = matmul_rate(device, matmul_n, torch.float16, repeats)
        if precision == "fp32":
            key = "matmul_tf32" if torch.backends.cuda.matmul.allow_tf32 else "matmul_fp32"
            out[key] = matmul_rate(device, matmul_n, torch.float32, repeats)
        out["note"] = "GPU: device-to-device copy; bf16 matmul (and the run's own matmul dtype)"
    else:
        out["matmul_fp32"] = matmul_rate(device, matmul_n, torch.float32, repeats)
        out["note"] = "CPU: matmul ceiling measured in fp32 (no fast bf16 path on this CPU), memcpy bandwidth"
    return out


def matmul_ceiling_for(ceilings: Dict[str, object], dtype: str) -> Optional[Dict[str, float]]:
    """The measured matmul entry matching a run's matmul dtype (fp32 on the CPU whatever it is)."""
    for key in (f"matmul_{dtype}", "matmul_fp32" if "matmul_bf16" not in ceilings else "matmul_bf16"):
        if key in ceilings:
            return ceilings[key]
    return None

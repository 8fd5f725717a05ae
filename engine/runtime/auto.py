"""Resolve ``auto`` runtime settings for the device a run lands on.

``runtime.compile=auto`` and ``runtime.kernels.{ema,centering,coding_rate}=auto`` (the defaults)
mean the fast path on a GPU (per-block torch.compile, the Triton kernels) and the plain eager
reference on a CPU, where Triton only runs in its slow interpreter and inductor's C++ compile
costs more than it saves for the small models people run there. ZeRO-3 cannot be compiled.
"""
from __future__ import annotations

import copy

import torch

KERNEL_KEYS = ("ema", "centering", "coding_rate")
LOSS_KERNEL_KEYS = ("centering", "coding_rate")


def resolve_auto(cfg, device: torch.device):
    """A copy of `cfg` with every ``auto`` runtime value replaced by a concrete choice."""
    cfg = copy.deepcopy(cfg)
    on_gpu = torch.device(device).type == "cuda"
    r = cfg.runtime
    if r.compile == "auto":
        # "auto" with a ZeRO stage is DeepSpeed too (engine/runtime/ddp.py), so it counts here.
        zero3 = r.distributed in ("deepspeed", "auto") and r.zero_stage == 3
        r.compile = "block" if on_gpu and not zero3 else "none"
    for key in KERNEL_KEYS:
        if getattr(r.kernels, key) == "auto":
            # Under compile=full the loss is inside the compiled graph: its eager reference is what
            # inductor traces and fuses (the Triton loss kernels have not been shown traceable with
            # fullgraph=True; DINO's takes its temperature as a Python float). The EMA runs outside.
            in_graph = r.compile == "full" and key in LOSS_KERNEL_KEYS
            setattr(r.kernels, key, "triton" if on_gpu and not in_graph else "eager")
    return cfg

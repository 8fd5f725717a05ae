"""FLOPs of a training step and the peak FLOP rates MFU is measured against.

MFU = (model FLOPs of one step) x (steps per second) / (the device's peak FLOP rate).
The model FLOPs are counted once, with ``torch.utils.flop_counter.FlopCounterMode``, on one step of
the *reference* eager implementation (matmuls, convolutions and attention; the engine's
recomputation or fused kernels do not inflate the count). `vit_forward_flops` is the same count
written out by hand for the backbone, a cross-check of the counter (the tests compare them).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .harness import run_step

# Dense (no sparsity) datasheet peaks in TFLOP/s, per GPU. Matched against the CUDA device name
# in order: the first pattern that matches wins.
DATASHEET_TFLOPS = [
    (r"H100.*PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}, "NVIDIA H100 PCIe datasheet"),
    (r"H100.*NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}, "NVIDIA H100 NVL datasheet"),
    (r"H200.*NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 417.5, "fp32": 60.0}, "NVIDIA H200 NVL datasheet"),
    (r"H100|H200|GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}, "NVIDIA H100/H200 SXM datasheet"),
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}, "NVIDIA A100 datasheet"),
    (r"L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6}, "NVIDIA L40S datasheet"),
]


def peak_dtype(precision: str, tf32: bool) -> str:
    """The matmul dtype a run's FLOPs execute in: bf16/fp16 under autocast, else TF32 or true fp32."""
    if precision in ("bf16", "fp16"):
        return precision
    return "tf32" if tf32 else "fp32"


def datasheet_peak(device_name: str, dtype: str) -> Optional[Dict[str, Any]]:
    """{"tflops", "source"} for a known GPU, else None (CPUs have no such number)."""
    for pattern, table, source in DATASHEET_TFLOPS:
        if re.search(pattern, device_name or ""):
            return {"tflops": table[dtype], "source": source, "dtype": dtype}
    return None


def _op_name(op) -> str:
    return str(op).split(".")[-1].replace("'", "").rstrip(")>")


def count_flops(fn) -> Dict[str, Any]:
    """Run `fn()` under FlopCounterMode; {"total", "by_op"}."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {_op_name(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]))}


def count_step_flops(trainer, batch: Dict[str, Any]) -> Dict[str, Any]:
    """FLOPs of one full training step of `trainer` (it advances by that step)."""
    return count_flops(lambda: run_step(trainer, batch))


# ------------------------------------------------------------------------------------------
# the same count by hand
# ------------------------------------------------------------------------------------------


def vit_forward_flops(backbone: torch.nn.Module, n_images: int, image_size: int) -> int:
    """Matmul/conv FLOPs (2 per multiply-add) of one ViT forward over `n_images` square images.

    Patch embedding + per block (qkv, q k^T, attn v, proj, two MLP layers). Norms, softmax and
    elementwise ops are not counted, as FlopCounterMode does not count them either.
    """
    p = backbone.patch_embed.patch_size
    d = backbone.embed_dim
    c = backbone.patch_embed.in_chans
    n_patches = (image_size // p) ** 2
    tokens = n_patches + 1 + int(getattr(backbone, "num_register_tokens", 0))
    flops = 2 * n_images * n_patches * d * c * p * p
    for blk in backbone.blocks:
        qkv_out = blk.attn.qkv.out_features
        hidden = blk.mlp.fc1.out_features
        flops += 2 * n_images * tokens * d * qkv_out  # qkv
        flops += 2 * 2 * n_images * tokens * tokens * d  # scores and weighted values, all heads
        flops += 2 * n_images * tokens * d * blk.attn.proj.out_features
        flops += 2 * 2 * n_images * tokens * d * hidden
    return int(flops)


def head_forward_flops(head: torch.nn.Module, rows: int) -> int:
    """Matmul FLOPs of the projection head over `rows` input vectors (every nn.Linear in it)."""
    return int(sum(2 * rows * m.in_features * m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)))


def analytic_step_flops(model, cfg) -> Dict[str, int]:
    """Backbones + heads of one step: teacher forward on the global crops, student forward and
    backward (x3) on all crops. Loss-function FLOPs and iBOT patch rows are left out, so this is a
    slight underestimate, printed beside the counted number as a sanity check."""
    b = cfg.data.batch_size
    n_global, n_local = 2 * b, cfg.crops.n_local * b
    sb, th = model.student["backbone"], model.teacher["head"]
    g, l = cfg.crops.global_size, cfg.crops.local_size
    student_fwd = vit_forward_flops(sb, n_global, g) + (vit_forward_flops(sb, n_local, l) if n_local else 0)
    student_fwd += head_forward_flops(model.student["head"], n_global + n_local)
    teacher_fwd = vit_forward_flops(model.teacher["backbone"], n_global, g) + head_forward_flops(th, n_global)
    return {"teacher_forward": teacher_fwd, "student_forward_backward": 3 * student_fwd,
            "total": teacher_fwd + 3 * student_fwd}

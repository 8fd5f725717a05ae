"""Small helpers shared by the objectives: precision policy, input checks, cosine similarity."""
from __future__ import annotations

import contextlib

import torch

# Spec T9: v1 cosine clamps each norm at 1e-8 before dividing.
COSINE_NORM_EPS = 1e-8


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp16/bf16/fp32 inputs are computed in fp32; float64 stays float64 (reference tests)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@contextlib.contextmanager
def full_precision(tensor: torch.Tensor):
    """Disable autocast for the tensor's device so casts to fp32 are not undone inside matmuls."""
    with torch.autocast(device_type=tensor.device.type, enabled=False):
        yield


def check_2d(name: str, fn: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: '{name}' must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{fn}: '{name}' must be 2-D (rows, dim), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: '{name}' must be a floating-point tensor, got {t.dtype}")


def split_crop_major(
    fn: str, student: torch.Tensor, teacher: torch.Tensor, n_crops: int, names=("student", "teacher")
):
    """Validate crop-major student (V*B, d) / teacher (2*B, d) tensors; return (V, B, d)."""
    s_name, t_name = names
    check_2d(s_name, fn, student)
    check_2d(t_name, fn, teacher)
    if not isinstance(n_crops, int) or n_crops < 2:
        raise ValueError(f"{fn}: 'n_crops' must be an int >= 2 (two global crops first), got {n_crops!r}")
    if student.shape[0] % n_crops:
        raise ValueError(
            f"{fn}: '{s_name}' has {student.shape[0]} rows, not a multiple of n_crops={n_crops} "
            "(expected crop-major (n_crops * B, dim))"
        )
    batch = student.shape[0] // n_crops
    if teacher.shape[0] != 2 * batch:
        raise ValueError(
            f"{fn}: '{t_name}' has {teacher.shape[0]} rows but '{s_name}' implies B={batch} "
            f"({student.shape[0]} rows / n_crops {n_crops}); '{t_name}' must be (2 * B, dim)"
        )
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{fn}: '{s_name}' dim {student.shape[1]} != '{t_name}' dim {teacher.shape[1]}"
        )
    if batch == 0:
        raise ValueError(f"{fn}: empty batch ('{s_name}' shape {tuple(student.shape)})")
    return n_crops, batch, student.shape[1]


def cosine_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-8) over the last dim, so <a_hat, b_hat> is the spec's clamped cosine."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(COSINE_NORM_EPS)


def same_view_mask(n_crops: int, device) -> torch.Tensor:
    """(2, V) bool, True where teacher global view g and student view v are the same crop (v == g)."""
    return torch.eye(2, n_crops, dtype=torch.bool, device=device)

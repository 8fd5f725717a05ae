"""Coding-rate kernels: the fused ½ log det(I + α ZᵀZ) with its gradient, and the SimDINO loss on it.

``get_coding_rate(kind)``: "eager" = ``flashdino.engine.objectives.coding_rate``; "triton" =
``coding_rate_fused`` (register kernel for min(B, p) ≤ 128, cuSOLVER above). Same signature:
``coding_rate(z, eps, world_size=1, reduce_cov=False, *, debug=None)``.
``get_simdino_loss(kind)``: the same for ``simdino_loss``.
"""
from __future__ import annotations

from .._common import check_kind
from .api import coding_rate_fused, rates_of_rows
from .linalg import coding_rate_linalg_rows
from .simdino import simdino_loss_fused
from .triton_cr import TRITON_MAX_N, coding_rate_triton_rows


def get_coding_rate(kind: str):
    check_kind(kind, "get_coding_rate")
    if kind == "eager":
        from flashdino.engine.objectives import coding_rate

        return coding_rate
    return coding_rate_fused


def get_simdino_loss(kind: str):
    check_kind(kind, "get_simdino_loss")
    if kind == "eager":
        from flashdino.engine.objectives import simdino_loss

        return simdino_loss
    return simdino_loss_fused


__all__ = ["TRITON_MAX_N", "coding_rate_fused", "coding_rate_linalg_rows", "coding_rate_triton_rows",
           "get_coding_rate", "get_simdino_loss", "rates_of_rows", "simdino_loss_fused"]

"""Teacher EMA kernels: the plain EMA updater and AdamW fused with the EMA.

``get_ema_updater(kind)`` returns a class built once from ``(teacher_params, student_params)``
with ``update(momentum)``: "eager" = ``torch._foreach_lerp_``, "triton" = one pointer-table
launch per dtype pair.
"""
from __future__ import annotations

from .._common import check_kind
from .eager import EagerEMAUpdater
from .functional import adamw_ema_, adamw_ema_eager_
from .optimizer import FusedAdamWEMA


def get_ema_updater(kind: str):
    check_kind(kind, "get_ema_updater")
    if kind == "eager":
        return EagerEMAUpdater
    from .triton_ema import TritonEMAUpdater

    return TritonEMAUpdater


__all__ = ["EagerEMAUpdater", "FusedAdamWEMA", "adamw_ema_", "adamw_ema_eager_", "get_ema_updater"]

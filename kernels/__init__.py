"""flashdino.kernels: Triton kernels beside their eager references, selected by config.

Registries (``kind`` is ``runtime.kernels.<name>`` of the config: "eager" or "triton"):

* ``get_ema_updater(kind)`` -> class ``(teacher_params, student_params)`` with ``update(momentum)``
* ``get_coding_rate(kind)`` -> ``coding_rate(z, eps, world_size=1, reduce_cov=False)``
* ``get_simdino_loss(kind)`` -> ``simdino_loss(student, teacher, n_crops, ...)``
* ``get_dino_centering(kind)`` -> ``dino_loss(student_logits, teacher_logits, center, n_crops, ...)``
  (teacher softmax centering + student cross-entropy + center update, fused)
* ``get_dino_cross_entropy(kind)`` -> ``dino_cross_entropy(student_logits, teacher_probs, n_crops, ...)``
* ``get_sinkhorn(kind)`` -> ``sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3)``

``FusedAdamWEMA`` is the optimizer that does AdamW and the teacher EMA in one pass;
``adamw_ema_`` is the same step on flat tensors (ZeRO shards).

The "eager" kinds of the loss functions are the functions of ``flashdino.engine.objectives``.
Kernel modules import lazily, so ``import flashdino.kernels`` never needs Triton.
"""
from __future__ import annotations

from ._common import KINDS, check_kind
from .ema import FusedAdamWEMA, adamw_ema_, get_ema_updater


def get_coding_rate(kind: str):
    from .coding_rate import get_coding_rate as _get

    return _get(kind)


def get_simdino_loss(kind: str):
    from .coding_rate import get_simdino_loss as _get

    return _get(kind)


def get_dino_centering(kind: str):
    from .centering import get_dino_centering as _get

    return _get(kind)


def get_dino_cross_entropy(kind: str):
    from .centering import get_dino_cross_entropy as _get

    return _get(kind)


def get_sinkhorn(kind: str):
    from .centering import get_sinkhorn as _get

    return _get(kind)


__all__ = ["KINDS", "FusedAdamWEMA", "adamw_ema_", "check_kind", "get_coding_rate", "get_dino_centering",
           "get_dino_cross_entropy", "get_ema_updater", "get_simdino_loss", "get_sinkhorn"]

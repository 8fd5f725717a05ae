"""DINO / DINOv2 teacher-centering kernels.

* ``get_dino_centering(kind)`` -> ``dino_loss(student_logits, teacher_logits, center, n_crops,
  student_temp=0.1, teacher_temp=0.04, center_momentum=0.9) -> (loss, new_center)``
* ``get_dino_cross_entropy(kind)`` -> ``dino_cross_entropy(student_logits, teacher_probs, n_crops,
  student_temp=0.1)``
* ``get_sinkhorn(kind)`` -> ``sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=3)``

"eager" returns the functions of ``flashdino.engine.objectives``; "triton" the fused kernels.
"""
from __future__ import annotations

from .._common import check_kind
from .api import dino_cross_entropy_fused, dino_loss_fused
from .sinkhorn import sinkhorn_knopp_fused


def _pick(kind, what, eager_name, fused):
    check_kind(kind, what)
    if kind == "eager":
        from flashdino.engine import objectives

        return getattr(objectives, eager_name)
    return fused


def get_dino_centering(kind: str):
    return _pick(kind, "get_dino_centering", "dino_loss", dino_loss_fused)


def get_dino_cross_entropy(kind: str):
    return _pick(kind, "get_dino_cross_entropy", "dino_cross_entropy", dino_cross_entropy_fused)


def get_sinkhorn(kind: str):
    return _pick(kind, "get_sinkhorn", "sinkhorn_knopp", sinkhorn_knopp_fused)


__all__ = ["dino_cross_entropy_fused", "dino_loss_fused", "get_dino_centering", "get_dino_cross_entropy",
           "get_sinkhorn", "sinkhorn_knopp_fused"]

"""flashdino.engine.objectives: the reference (eager) loss functions, spec sections 2-4.

Every function takes fp16/bf16/fp32 tensors and computes in fp32 with autocast off (float64
inputs are computed in float64, for reference tests). Crop order is crop-major everywhere.
"""
from .coding_rate import coding_rate, coding_rate_alpha, coding_rate_gamma, debug_checks_enabled
from .dino import dino_cross_entropy, dino_loss, softmax_center_teacher, update_center
from .ibot import ibot_patch_loss
from .koleo import koleo_loss
from .simdino import simdino_loss, simdino_terms
from .simdinov2 import cosine_patch_loss, simdinov2_loss
from .sinkhorn import sinkhorn_knopp

__all__ = [
    "coding_rate",
    "coding_rate_alpha",
    "coding_rate_gamma",
    "cosine_patch_loss",
    "debug_checks_enabled",
    "dino_cross_entropy",
    "dino_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "simdino_loss",
    "simdino_terms",
    "simdinov2_loss",
    "sinkhorn_knopp",
    "softmax_center_teacher",
    "update_center",
]

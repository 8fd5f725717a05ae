"""Projection heads (spec 1.3): the DINO head MLP, L2 normalisation, optional prototype layer.

    z = normalize(Linear -> GELU -> Linear -> GELU -> Linear (x))          (SimDINO / SimDINOv2 output)
    logits = z @ W^T,  W_k = g_k * v_k / ||v_k||                             (DINO / DINOv2 prototypes)

The head works on any leading shape, so SimDINOv2 can feed one flat (N, D) tensor that mixes CLS
and patch tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import init_linear_

NORM_EPS = 1e-12
NORM_EPS_FP16 = 1e-6  # 1e-12 underflows to 0 in fp16 (spec T9)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||_2, eps) over the last dim; eps 1e-6 for fp16 tensors, else 1e-12."""
    eps = NORM_EPS_FP16 if x.dtype == torch.float16 else NORM_EPS
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation per output row: W_k = g_k * v_k / ||v_k||.

    Explicit parameters ``weight_g`` (K, 1) and ``weight_v`` (K, in) keep the names of the
    classic ``torch.nn.utils.weight_norm`` so DINO / DINOv2 checkpoints load without key edits."""

    def __init__(self, in_features: int, out_features: int, freeze_norm: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_norm)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # The reference creates this layer after its trunc-normal init pass, so v keeps nn.Linear's
        # default init (Kaiming-uniform, a = sqrt(5)); only g is set (to 1).
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, norm_frozen={not self.weight_g.requires_grad}"


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Module:
    # Same layout as the DINO/DINOv2 heads (keys mlp.0, mlp.2, ...; a bare Linear when nlayers == 1).
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2 normalise -> (if n_prototypes > 0) weight-normalised prototype layer.

    Output dim: `bottleneck_dim` without prototypes (SimDINO, SimDINOv2), else `n_prototypes`.
    `norm_last_layer` freezes the prototype norms g at 1 (DINO); DINOv2 trains them."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        n_prototypes: int = 0,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if value <= 0:
                raise ValueError(f"DINOHead {name} must be positive, got {value}")
        if n_prototypes < 0:
            raise ValueError(f"DINOHead n_prototypes must be >= 0, got {n_prototypes}")
        self.in_dim = in_dim
        self.out_dim = n_prototypes if n_prototypes else bottleneck_dim
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.mlp.apply(init_linear_)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes, freeze_norm=norm_last_layer) if n_prototypes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"DINOHead expects features with last dim {self.in_dim}, got shape {tuple(x.shape)}")
        z = l2_normalize(self.mlp(x))
        return self.last_layer(z) if self.last_layer is not None else z

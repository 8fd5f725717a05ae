"""Position-embedding interpolation for crops of another size than the native one (spec 1.2).

The learned embedding covers ``num_prefix`` leading tokens (CLS) plus a square M x M patch grid.
For a crop with an (h, w) patch grid the patch part is resampled bicubically:

* style "v1" (DINO): ``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)``, no antialias. The +0.1
  is DINO's historical offset; it also shifts the sampling positions slightly, so it must be kept
  for parity with DINO checkpoints.
* style "v2" (DINOv2): explicit output ``size = (h, w)``, antialias on.

Nothing is cached: the resampling is recomputed on every call so it stays a pure function of the
parameter (safe under torch.compile and while the parameter trains).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

STYLES = ("v1", "v2")
V1_OFFSET = 0.1


def grid_side(pos_embed: torch.Tensor, num_prefix: int = 1) -> int:
    """Side M of the square patch grid that `pos_embed` (1, num_prefix + M*M, D) covers."""
    n = pos_embed.shape[1] - num_prefix
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed covers {n} patch positions, which is not a square grid")
    return m


def resample_patch_grid(grid: torch.Tensor, size: Tuple[int, int], style: str) -> torch.Tensor:
    """Bicubic resampling of a (1, D, M, M) grid to (1, D, h, w) with the style's conventions."""
    h, w = size
    m_h, m_w = grid.shape[-2:]
    if style == "v1":
        scale = ((h + V1_OFFSET) / m_h, (w + V1_OFFSET) / m_w)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    elif style == "v2":
        out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    else:
        raise ValueError(f"unknown pos-embed style {style!r}; valid: {', '.join(STYLES)}")
    if tuple(out.shape[-2:]) != (h, w):  # the v1 scale-factor route could round to another size
        raise RuntimeError(f"pos-embed interpolation produced a {tuple(out.shape[-2:])} grid, expected {(h, w)}")
    return out


def interpolate_pos_embed(
    pos_embed: torch.Tensor, grid_hw: Tuple[int, int], num_prefix: int = 1, style: str = "v1"
) -> torch.Tensor:
    """Position embedding (1, num_prefix + h*w, D) for an (h, w) patch grid.

    Returns `pos_embed` itself at the native grid size. The resampling runs in fp32 and the result
    is cast back to the parameter's dtype."""
    if style not in STYLES:
        raise ValueError(f"unknown pos-embed style {style!r}; valid: {', '.join(STYLES)}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"patch grid must be positive, got {(h, w)}")
    m = grid_side(pos_embed, num_prefix)
    if (h, w) == (m, m):
        return pos_embed
    dim = pos_embed.shape[-1]
    prefix = pos_embed[:, :num_prefix]
    grid = pos_embed[:, num_prefix:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patches = resample_patch_grid(grid, (h, w), style).permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat((prefix, patches.to(pos_embed.dtype)), dim=1)

"""KoLeo (Kozachenko-Leonenko) nearest-neighbour entropy regularizer (spec 4.2), in fp32."""
from __future__ import annotations

import torch

from ._common import compute_dtype, full_precision

KOLEO_EPS = 1e-8  # used in the normalization, the pairwise-distance offset and the log (T9)


def koleo_loss(x: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_i log(||x_i_hat - x_hat_n(i) + 1e-8|| + 1e-8), n(i) = most similar j != i.

    x: (B, D) (e.g. one global crop's backbone CLS outputs) -> 0-d tensor, or batched (G, B, D)
    -> (G,), one value per group. Always computed in fp32 (float64 for float64 input): in fp16
    the 1e-8 epsilons would round to 0. The diagonal is excluded with -inf, so a point is never
    its own neighbour (the reference fills it with -1, which can tie with antipodal points).
    """
    fn = "koleo_loss"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: 'x' must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{fn}: 'x' must be (B, D) or (G, B, D), got shape {tuple(x.shape)}")
    if x.shape[-2] < 2:
        raise ValueError(f"{fn}: needs at least 2 rows to find nearest neighbours, got shape {tuple(x.shape)}")
    with full_precision(x):
        xs = x.to(compute_dtype(x))
        unit = xs / xs.norm(dim=-1, keepdim=True).clamp_min(KOLEO_EPS)
        with torch.no_grad():  # the neighbour choice is discrete; gradient flows through the distance
            sims = unit @ unit.mT
            sims.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
            neighbour = sims.argmax(dim=-1)
        nearest = torch.gather(unit, -2, neighbour.unsqueeze(-1).expand_as(unit))
        dist = (unit - nearest + KOLEO_EPS).norm(dim=-1)
        return -torch.log(dist + KOLEO_EPS).mean(-1)

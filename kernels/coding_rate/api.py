"""``coding_rate`` with the signature and semantics of ``flashdino.engine.objectives.coding_rate``,
dispatching to the register kernel (small Gram/covariance) or to torch.linalg (large, float64)."""
from __future__ import annotations

import torch

from flashdino.engine.distributed import all_reduce_sum_differentiable, get_rank, get_world_size

from .linalg import coding_rate_linalg_rows, half_logdet_spd
from .triton_cr import TRITON_MAX_N, coding_rate_triton_rows


def _debug_enabled(debug):
    from flashdino.engine.objectives import debug_checks_enabled

    return debug_checks_enabled(debug)


def validate_coding_rate_args(fn: str, z, eps, world_size, reduce_cov) -> None:
    if not isinstance(z, torch.Tensor) or not z.is_floating_point():
        raise TypeError(f"{fn}: 'z' must be a floating-point tensor, got {getattr(z, 'dtype', type(z))}")
    if z.dim() not in (2, 3):
        raise ValueError(f"{fn}: 'z' must be (B, p) or (G, B, p), got shape {tuple(z.shape)}")
    if z.shape[-2] == 0 or z.shape[-1] == 0 or (z.dim() == 3 and z.shape[0] == 0):
        raise ValueError(f"{fn}: 'z' is empty, shape {tuple(z.shape)}")
    if not eps > 0:
        raise ValueError(f"{fn}: 'eps' must be > 0, got {eps!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{fn}: 'world_size' must be an int >= 1, got {world_size!r}")
    if reduce_cov and world_size != get_world_size():
        raise ValueError(f"{fn}: reduce_cov=True sums the covariance over the process group, which has "
                         f"{get_world_size()} rank(s), but world_size={world_size} was passed; they must match")


def rates_of_rows(z: torch.Tensor, alpha: float, y: torch.Tensor | None = None,
                  max_triton_n: int = TRITON_MAX_N) -> torch.Tensor:
    """(G, B, p) -> (G,) rates of Z = z (or (z + y)/2): register kernel when min(B, p) ≤
    max_triton_n, else cuSOLVER."""
    if min(z.shape[1:]) <= min(max_triton_n, TRITON_MAX_N) and z.dtype != torch.float64:
        return coding_rate_triton_rows(z, alpha, y)
    if y is not None:
        z = (z.float() + y.detach().float()) / 2
    return coding_rate_linalg_rows(z, alpha)


def _gather_rows(z: torch.Tensor) -> torch.Tensor:
    """(G, B, p) -> (G, N·B, p): every rank's rows in rank order, through a differentiable SUM of
    zero-padded slots (exact), so each rank gets N × its share of the gradient (spec T15)."""
    n, r = get_world_size(), get_rank()
    g, b, p = z.shape
    slots = [z.new_zeros(g, r * b, p), z, z.new_zeros(g, (n - 1 - r) * b, p)]
    return all_reduce_sum_differentiable(torch.cat(slots, dim=1))


def coding_rate_fused(z: torch.Tensor, eps: float, world_size: int = 1, reduce_cov: bool = False, *,
                      debug: bool | None = None, max_triton_n: int = TRITON_MAX_N) -> torch.Tensor:
    """R = ½ log det(I_p + α ZᵀZ), α = p / (B · world_size · eps); z (B, p) or (G, B, p) -> () or (G,).

    fp32 arithmetic whatever the input dtype (float64 input: float64, via torch.linalg).
    reduce_cov: the covariance is summed over the process group (differentiable); when N·B < p
    the rows of all ranks are gathered instead and the Gram form is used.
    """
    fn = "coding_rate"
    validate_coding_rate_args(fn, z, eps, world_size, reduce_cov)
    batch, dim = z.shape[-2:]
    alpha = dim / (batch * world_size * eps)
    z3 = z.unsqueeze(0) if z.dim() == 2 else z
    if reduce_cov and world_size > 1:
        if batch * world_size < dim:
            rates = rates_of_rows(_gather_rows(z3.float() if z3.dtype != torch.float64 else z3), alpha,
                                  max_triton_n=max_triton_n)
        else:
            with torch.autocast(device_type=z.device.type, enabled=False):
                zc = z3.float() if z3.dtype != torch.float64 else z3
                cov = all_reduce_sum_differentiable(zc.mT @ zc)
                eye = torch.eye(dim, dtype=cov.dtype, device=cov.device)
                rates = half_logdet_spd(eye + alpha * cov)
    else:
        rates = rates_of_rows(z3, alpha, max_triton_n=max_triton_n)
    if _debug_enabled(debug):
        bad = ~torch.isfinite(rates)
        if bool(bad.any()):
            raise FloatingPointError(f"{fn}: non-finite coding rate for view(s) {bad.nonzero().flatten().tolist()}; "
                                     "the features contain NaN/Inf or overflow")
    return rates[0] if z.dim() == 2 else rates

"""iBOT block masks for a whole batch at once (spec section 3.2), without a per-sample Python loop.

The reference generator (:class:`flashdino.pipelines.masking.BlockMaskGenerator`) builds one mask at a
time: while the mask is below its target it tries up to 10 random rectangles and keeps the first one
that adds between 1 and `budget` new patches. Here every mask of the batch advances in lockstep:
each *round* draws the 10 candidate rectangles of every still-growing mask at once, counts the new
patches of all candidates with integral images, keeps each mask's first acceptable candidate and
paints all accepted rectangles with one broadcast. The Python loop runs over rounds (one per block,
~10 for a 0.5-ratio target), not over samples.

Same distribution as the reference: the attempts of a round are i.i.d. given the mask, so drawing all
10 and keeping the first acceptable one is the same as drawing them lazily. (Not the same *draws*:
the random stream is consumed differently, so masks are equal in distribution, not bit for bit.)
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from .masking import (MAX_BLOCK_ATTEMPTS, BatchMasking, block_shape_parameters, check_batch_mask_args,
                      mask_indices_and_weights, mask_ratio_edges)

__all__ = ["VectorizedBlockMaskGenerator", "sample_batch_masks_fast", "FastBatchMasking", "mask_indices_and_weights"]


class VectorizedBlockMaskGenerator:
    """Block masks for many targets at once; same parameters and semantics as ``BlockMaskGenerator``."""

    def __init__(
        self,
        grid: Union[int, Tuple[int, int]] = (14, 14),
        min_num_patches: int = 4,
        max_num_patches: Optional[float] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        attempts: int = MAX_BLOCK_ATTEMPTS,
    ):
        self.height, self.width, max_patches, self.log_aspect = block_shape_parameters(
            "VectorizedBlockMaskGenerator", grid, max_num_patches, min_aspect, max_aspect
        )
        if attempts < 1:
            raise ValueError(f"VectorizedBlockMaskGenerator: attempts must be >= 1, got {attempts}")
        self.num_patches = self.height * self.width
        self.min_num_patches = float(min_num_patches)
        self.max_num_patches = float(max_patches)
        self.attempts = int(attempts)

    def __repr__(self) -> str:
        return (
            f"VectorizedBlockMaskGenerator(grid={self.height}x{self.width}, patches per block "
            f"[{self.min_num_patches:g}, {self.max_num_patches:g}])"
        )

    def generate(self, targets, rng: np.random.Generator) -> np.ndarray:
        """(n, H, W) bool masks; mask i has at most ``targets[i]`` patches (fewer when a round fails)."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"VectorizedBlockMaskGenerator: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if (targets < 0).any():
            raise ValueError(f"VectorizedBlockMaskGenerator: targets must be >= 0, got min {targets.min()}")
        n, H, W, A = targets.size, self.height, self.width, self.attempts
        masks = np.zeros((n, H, W), dtype=bool)
        count = np.zeros(n, dtype=np.int64)
        active = count < targets
        rows, cols = np.arange(H), np.arange(W)
        while active.any():
            idx = np.nonzero(active)[0]
            m = idx.size
            budget = np.minimum(targets[idx] - count[idx], self.max_num_patches).astype(np.float64)
            # Python's uniform(a, b) = a + (b - a) * u, also when b < a (budget below the minimum).
            area = self.min_num_patches + (budget[:, None] - self.min_num_patches) * rng.random((m, A))
            log_lo, log_hi = self.log_aspect
            aspect = np.exp(log_lo + (log_hi - log_lo) * rng.random((m, A)))
            h = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint: ties to even, like round()
            w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
            fits = (h < H) & (w < W)
            hc, wc = np.where(fits, h, 0), np.where(fits, w, 0)
            # Inclusive randint(0, H - h): floor(u * (H - h + 1)).
            top = np.floor(rng.random((m, A)) * (H - hc + 1)).astype(np.int64)
            left = np.floor(rng.random((m, A)) * (W - wc + 1)).astype(np.int64)
            # Already-masked patches inside each candidate, from integral images of the current masks.
            integral = np.zeros((m, H + 1, W + 1), dtype=np.int64)
            integral[:, 1:, 1:] = masks[idx].cumsum(1).cumsum(2)
            r = np.arange(m)[:, None]
            inside = (
                integral[r, top + hc, left + wc] - integral[r, top, left + wc]
                - integral[r, top + hc, left] + integral[r, top, left]
            )  # fmt: skip
            new = hc * wc - inside
            ok = fits & (new > 0) & (new <= budget[:, None])
            found = ok.any(axis=1)
            first = ok.argmax(axis=1)
            # Masks whose 10 attempts all failed stop growing (the reference breaks out of its loop).
            active[idx[~found]] = False
            if not found.any():
                break
            g = idx[found]
            sel = first[found]
            rf = np.nonzero(found)[0]
            t, l_, hh, ww = top[rf, sel], left[rf, sel], hc[rf, sel], wc[rf, sel]
            in_rows = (rows[None, :] >= t[:, None]) & (rows[None, :] < (t + hh)[:, None])
            in_cols = (cols[None, :] >= l_[:, None]) & (cols[None, :] < (l_ + ww)[:, None])
            masks[g] |= in_rows[:, :, None] & in_cols[:, None, :]
            count[g] += new[rf, sel]
            active[g] = count[g] < targets[g]
        return masks

    def __call__(self, n_target: int, rng: np.random.Generator) -> np.ndarray:
        """One (H, W) mask, for drop-in use where the reference generator is called per sample."""
        return self.generate([n_target], rng)[0]


def stratified_targets(n_masked: int, n_patches: int, ratio_min_max, u: np.ndarray) -> np.ndarray:
    """floor(P * U(a_k, a_{k+1})) for every stratum k, in float32 like the reference collate."""
    edges = mask_ratio_edges(n_masked, ratio_min_max).astype(np.float32)
    lo, hi = edges[:-1], edges[1:]
    ratio = lo + (hi - lo) * u.astype(np.float32)
    return (np.float32(n_patches) * ratio).astype(np.float32).astype(np.int64)


def sample_batch_masks_fast(
    n_global_crops: int,
    grid: Union[int, Tuple[int, int]],
    probability: float = 0.5,
    ratio_min_max: Tuple[float, float] = (0.1, 0.5),
    rng: Optional[np.random.Generator] = None,
    generator: Optional[VectorizedBlockMaskGenerator] = None,
) -> torch.Tensor:
    """(n_global_crops, P) bool masks of one batch, distributed as ``masking.sample_batch_masks``.

    floor(n * probability) crops get a block mask with a stratified target ratio, the rest are
    empty, and the rows are randomly permuted.
    """
    lo, hi, height, width, generator = check_batch_mask_args(
        "sample_batch_masks_fast", n_global_crops, grid, probability, ratio_min_max, generator,
        VectorizedBlockMaskGenerator,
    )
    rng = rng if rng is not None else np.random.default_rng()
    n_patches = height * width
    n_masked = int(n_global_crops * probability)
    masks = np.zeros((n_global_crops, n_patches), dtype=bool)
    if n_masked:
        targets = stratified_targets(n_masked, n_patches, (lo, hi), rng.random(n_masked))
        masks[:n_masked] = generator.generate(targets, rng).reshape(n_masked, n_patches)
    masks = masks[rng.permutation(n_global_crops)]
    return torch.from_numpy(masks)


class FastBatchMasking(BatchMasking):
    """Drop-in for ``masking.BatchMasking`` with the vectorized generator and batch sampler."""

    default_generator = VectorizedBlockMaskGenerator
    sample = staticmethod(sample_batch_masks_fast)

"""Which images each rank sees in an epoch, and the keyed RNG streams every loader shares.

Kept free of torch: DALI's spawned source workers import it. The torchvision loader
(``ResumableSampler``) and the DALI source (``MultiCropSource``) both derive their order from here,
so both pipelines give a rank the same images in the same order for the same (seed, epoch).
"""
from __future__ import annotations

import math

import numpy as np

# Stream tags keep the RNG streams of different purposes apart even with equal numeric keys.
SAMPLE_STREAM = 0
ORDER_STREAM = 1
MASK_STREAM = 2


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([SAMPLE_STREAM, seed, epoch, index]))


def order_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([ORDER_STREAM, seed, epoch]))


def mask_rng(seed: int, epoch: int, batch_index: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([MASK_STREAM, seed, epoch, rank, batch_index]))


def samples_per_rank(n: int, world_size: int, pad: bool) -> int:
    """Each rank's share of `n` images: floor(n/N), or ceil(n/N) when padded.

    Padding is what the v1 tree's DistributedSampler does, so its epochs have
    floor(ceil(n/N)/B) iterations; the v2 tree drops the remainder: floor(n/(N*B)) (spec 1.4).
    """
    return math.ceil(n / world_size) if pad else n // world_size


def rank_indices(n: int, seed: int, epoch: int, rank: int, world_size: int, pad: bool = False) -> np.ndarray:
    """This rank's order for `epoch`: every N-th image of the (seed, epoch) permutation, starting at
    `rank`; padded shares repeat the permutation's first images, as DistributedSampler does."""
    perm = order_rng(seed, epoch).permutation(n)
    total = samples_per_rank(n, world_size, pad) * world_size
    return np.resize(perm, total)[rank::world_size]  # resize repeats perm cyclically when total > n

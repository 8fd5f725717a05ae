"""Reference iBOT block masking (spec section 3.2, trap T13).

:class:`BlockMaskGenerator` is a faithful per-sample loop: fed a ``random.Random`` seeded like the
reference's global ``random`` module, it reproduces the reference masks draw for draw. It also
accepts a ``numpy.random.Generator`` (what the loader uses, so masks are reproducible from
(seed, epoch, batch index)). The vectorized generator for fast pipelines is checked against this one.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Tuple, Union

import numpy as np
import torch

Rng = Union[random.Random, np.random.Generator]
MAX_BLOCK_ATTEMPTS = 10


class _Draws:
    """Python ``random`` semantics (uniform = a + (b - a) * u, inclusive randint) on either RNG kind."""

    def __init__(self, rng: Rng):
        if isinstance(rng, random.Random):
            self._py = rng
            self._np = None
        elif isinstance(rng, np.random.Generator):
            self._py = None
            self._np = rng
        else:
            raise TypeError(f"masking: rng must be a random.Random or numpy.random.Generator, got {type(rng).__name__}")

    def random(self) -> float:
        return self._py.random() if self._py is not None else float(self._np.random())

    def uniform(self, a: float, b: float) -> float:
        # Written out (not Generator.uniform) so that b < a behaves exactly as Python's uniform does.
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        return self._py.randint(a, b) if self._py is not None else int(self._np.integers(a, b, endpoint=True))

    def shuffle(self, items: list) -> None:
        if self._py is not None:
            self._py.shuffle(items)
        else:
            order = self._np.permutation(len(items))
            items[:] = [items[i] for i in order]


def _as_grid(grid) -> Tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def block_shape_parameters(name, grid, max_num_patches, min_aspect, max_aspect):
    """(height, width, max_num_patches, log-aspect range) shared by the block-mask generators."""
    height, width = _as_grid(grid)
    if height < 1 or width < 1:
        raise ValueError(f"{name}: grid must be positive, got {grid}")
    if min_aspect <= 0:
        raise ValueError(f"{name}: min_aspect must be > 0, got {min_aspect}")
    # Set explicitly (trap T13): the reference reaches 0.5 * P through an accidental chain of * and //.
    max_patches = 0.5 * height * width if max_num_patches is None else max_num_patches
    max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
    return height, width, max_patches, (math.log(min_aspect), math.log(max_aspect))


class BlockMaskGenerator:
    """Masks rectangles of random area and aspect ratio on an (H, W) patch grid until a target count."""

    def __init__(
        self,
        grid: Union[int, Tuple[int, int]] = (14, 14),
        min_num_patches: int = 4,
        max_num_patches: Optional[float] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
    ):
        self.height, self.width, self.max_num_patches, self.log_aspect = block_shape_parameters(
            "BlockMaskGenerator", grid, max_num_patches, min_aspect, max_aspect
        )
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches

    def __repr__(self) -> str:
        return (
            f"BlockMaskGenerator(grid={self.height}x{self.width}, patches per block "
            f"[{self.min_num_patches}, {self.max_num_patches}], aspect [{math.exp(self.log_aspect[0]):.3f}, "
            f"{math.exp(self.log_aspect[1]):.3f}])"
        )

    def add_block(self, mask: np.ndarray, budget: float, draws: _Draws) -> Tuple[int, Optional[Tuple[int, int, int, int]]]:
        """Try up to 10 rectangles; mark the first that adds between 1 and `budget` new patches.

        Returns (patches added, (top, left, h, w) of the marked rectangle or None).
        """
        for _ in range(MAX_BLOCK_ATTEMPTS):
            # Python uniform: a budget below min_num_patches is allowed and gives an area in [budget, min].
            area = draws.uniform(self.min_num_patches, budget)
            aspect = math.exp(draws.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))  # round(): ties to even, as the reference
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = draws.randint(0, self.height - h)
                left = draws.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[...] = True
                    return new, (top, left, h, w)
        return 0, None

    def __call__(self, n_target: int, rng: Rng) -> np.ndarray:
        """An (H, W) bool mask with at most `n_target` patches (fewer when 10 attempts in a row fail)."""
        draws = rng if isinstance(rng, _Draws) else _Draws(rng)
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_target:
            budget = min(n_target - count, self.max_num_patches)
            added, _ = self.add_block(mask, budget, draws)
            if added == 0:
                break
            count += added
        return mask


def mask_ratio_edges(n_masked: int, ratio_min_max: Tuple[float, float]) -> np.ndarray:
    """Stratification bin edges: torch.linspace in float32, as the reference collate builds them."""
    return torch.linspace(float(ratio_min_max[0]), float(ratio_min_max[1]), n_masked + 1).numpy()


def stratified_target(n_patches: int, lo: np.float32, hi: np.float32, u: float) -> int:
    """floor(P * U(lo, hi)) evaluated in float32 like the reference (its bin edges are float32 tensors)."""
    lo, hi = np.float32(lo), np.float32(hi)
    ratio = lo + (hi - lo) * np.float32(u)
    return int(np.float32(n_patches) * np.float32(ratio))


def check_batch_mask_args(fn, n_global_crops, grid, probability, ratio_min_max, generator, generator_cls):
    """Validate a batch-mask request; returns (lo, hi, height, width, generator) with a default generator."""
    if n_global_crops < 0:
        raise ValueError(f"{fn}: n_global_crops must be >= 0, got {n_global_crops}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"{fn}: probability must be in [0, 1], got {probability}")
    lo, hi = ratio_min_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{fn}: ratio_min_max must satisfy 0 <= min <= max <= 1, got {tuple(ratio_min_max)}")
    height, width = _as_grid(grid)
    if generator is None:
        generator = generator_cls((height, width))
    elif (generator.height, generator.width) != (height, width):
        raise ValueError(f"{fn}: generator grid {generator.height}x{generator.width} != grid {height}x{width}")
    return lo, hi, height, width, generator


def sample_batch_masks(
    n_global_crops: int,
    grid: Union[int, Tuple[int, int]],
    probability: float = 0.5,
    ratio_min_max: Tuple[float, float] = (0.1, 0.5),
    rng: Optional[Rng] = None,
    generator: Optional[BlockMaskGenerator] = None,
) -> torch.Tensor:
    """Masks of one batch's global crops: (n_global_crops, P) bool.

    floor(n * probability) crops get a block mask whose target ratio is drawn from its own
    stratum of linspace(ratio_min, ratio_max); the other crops get an empty mask; the list is then
    shuffled so which crops are masked is random.
    """
    lo, hi, height, width, generator = check_batch_mask_args(
        "sample_batch_masks", n_global_crops, grid, probability, ratio_min_max, generator, BlockMaskGenerator
    )
    draws = _Draws(rng if rng is not None else np.random.default_rng())
    n_patches = height * width
    n_masked = int(n_global_crops * probability)
    edges = mask_ratio_edges(n_masked, (lo, hi))
    masks = []
    for k in range(n_masked):
        target = stratified_target(n_patches, edges[k], edges[k + 1], draws.random())
        masks.append(generator(target, draws))
    empty = np.zeros((height, width), dtype=bool)
    masks.extend(empty.copy() for _ in range(n_global_crops - n_masked))
    draws.shuffle(masks)
    if not masks:
        return torch.zeros((0, n_patches), dtype=torch.bool)
    return torch.from_numpy(np.stack(masks).reshape(n_global_crops, n_patches))


def mask_indices_and_weights(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of masked patches in the flattened (n * P) mask (ascending) and their weights.

    Every masked patch of crop i gets weight 1 / max(|M_i|, 1), so each masked crop's weights sum to 1.
    """
    if masks.dtype != torch.bool:
        raise TypeError(f"mask_indices_and_weights: masks must be a bool tensor, got {masks.dtype}")
    flat = masks.reshape(masks.shape[0], -1)
    indices = flat.reshape(-1).nonzero().reshape(-1)
    per_crop = 1.0 / flat.sum(dim=1).clamp(min=1).to(torch.float32)
    weights = per_crop.unsqueeze(1).expand_as(flat)[flat]
    return indices, weights


class BatchMasking:
    """The per-batch mask sampler the collate function calls: ``masking(n_global_crops, rng)``.

    Subclasses swap the block generator and the batch sampler (``fast_masking.FastBatchMasking``).
    """

    default_generator = BlockMaskGenerator
    sample = staticmethod(sample_batch_masks)

    def __init__(
        self,
        grid: Union[int, Tuple[int, int]],
        probability: float = 0.5,
        ratio_min_max: Tuple[float, float] = (0.1, 0.5),
        generator=None,
    ):
        self.grid = _as_grid(grid)
        self.probability = float(probability)
        self.ratio_min_max = (float(ratio_min_max[0]), float(ratio_min_max[1]))
        self.generator = generator if generator is not None else self.default_generator(self.grid)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_config(cls, cfg):
        """Masking for SimDINOv2 / DINOv2 (grid = global_size // patch_size); None for other methods."""
        if cfg.objective.method not in ("simdinov2", "dinov2"):
            return None
        side = cfg.crops.global_size // cfg.model.patch_size
        return cls(
            grid=(side, side),
            probability=cfg.objective.mask_sample_probability,
            ratio_min_max=(cfg.objective.mask_ratio_min, cfg.objective.mask_ratio_max),
        )

    def __call__(self, n_global_crops: int, rng: Rng) -> torch.Tensor:
        return self.sample(n_global_crops, self.grid, self.probability, self.ratio_min_max, rng=rng,
                           generator=self.generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(grid={self.grid}, probability={self.probability}, ratio={self.ratio_min_max})"

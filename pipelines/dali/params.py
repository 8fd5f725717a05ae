"""Per-view augmentation parameters of one image, packed as arrays for DALI argument inputs.

Two samplers produce the same :class:`PackedParams`:

* ``"fast"``: :func:`sample_fast` draws all views at once with NumPy (about 10x cheaper than the
  reference's per-crop Python loop, which matters inside the external-source workers). Same
  distribution as spec 1.1 / torchvision's ``RandomResizedCrop.get_params``; different draws.
* ``"reference"``: :func:`sample_reference` calls ``MultiCropAugmentation.sample_params`` with the
  same per-sample RNG as the torchvision loader, so both pipelines get *identical* parameters for
  the same (seed, epoch, index): switching pipelines then changes only the pixel arithmetic (and,
  for the v2 methods, the iBOT masks: DALI's loader draws them with the vectorized generator, equal
  in distribution to the reference's, not draw for draw).

This module is imported by the external-source worker processes, so it avoids torch; the recipe's
constants reach it through :class:`ViewSpec`, built in the main process from ``augment.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Sequence, Tuple

import numpy as np

OP_BRIGHTNESS, OP_CONTRAST, OP_SATURATION, OP_HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class ViewSpec:
    """Everything random about the views of one image (plain numbers: picklable, no torch)."""

    sizes: Tuple[int, ...]  # output side per view; views 0, 1 global, the rest local
    scales: Tuple[Tuple[float, float], ...]  # RandomResizedCrop area scale per view
    blur_probs: Tuple[float, ...]
    solarize_probs: Tuple[float, ...]
    blur_kind: str = "pil"  # "pil": window from sigma (3-sigma rule); "torchvision": fixed kernel
    blur_kernel: int = 9
    aspect_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    crop_attempts: int = 10
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter_strength: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # b, c, s, h
    grayscale_prob: float = 0.2
    blur_range: Tuple[float, float] = (0.1, 2.0)

    @property
    def n_views(self) -> int:
        return len(self.sizes)

    @property
    def n_local(self) -> int:
        return self.n_views - 2

    @classmethod
    def from_augmentation(cls, aug) -> "ViewSpec":
        """From a ``flashdino.pipelines.augment.MultiCropAugmentation`` and the recipe constants there."""
        from .. import augment as A

        sizes = (aug.global_size,) * 2 + (aug.local_size,) * aug.n_local
        scales = (tuple(aug.global_scale),) * 2 + (tuple(aug.local_scale),) * aug.n_local
        return cls(
            sizes=tuple(int(s) for s in sizes),
            scales=tuple((float(a), float(b)) for a, b in scales),
            blur_probs=tuple(float(p[0]) for p in aug.view_policies),
            solarize_probs=tuple(float(p[1]) for p in aug.view_policies),
            blur_kind=aug.blur,
            blur_kernel=int(A.TORCHVISION_BLUR_KERNEL),
            aspect_ratio=tuple(float(r) for r in A.ASPECT_RATIO),
            crop_attempts=int(A.CROP_ATTEMPTS),
            flip_prob=float(A.FLIP_PROB),
            jitter_prob=float(A.JITTER_PROB),
            jitter_strength=tuple(float(A.JITTER_STRENGTH[k]) for k in ("brightness", "contrast", "saturation", "hue")),
            grayscale_prob=float(A.GRAYSCALE_PROB),
            blur_range=tuple(float(x) for x in aug.blur_sigma),
        )

    def blur_window(self, sigma: np.ndarray) -> np.ndarray:
        """Odd blur window per view (1 = no blur): the torchvision kernel, or 2*ceil(3 sigma)+1 for PIL."""
        sigma = np.asarray(sigma, dtype=np.float64)
        if self.blur_kind == "torchvision":
            win = np.full(sigma.shape, self.blur_kernel, dtype=np.int32)
        else:
            win = (2 * np.maximum(np.ceil(3.0 * sigma), 1) + 1).astype(np.int32)
        return np.where(sigma > 0, win, 1).astype(np.int32)


class PackedParams(NamedTuple):
    """Per-view parameters of one image; row v = view v."""

    windows: np.ndarray  # (V, 4) float32: roi_start (y, x), roi_end (y, x); x reversed = flipped
    color: np.ndarray  # (V, 4) float32: brightness, contrast, saturation, hue (identity = not applied)
    order: np.ndarray  # (V, 4) int32: jitter op order (0 brightness, 1 contrast, 2 saturation, 3 hue)
    flags: np.ndarray  # (V, 3) int32: grayscale, solarize, blur window (1 = no blur)
    sigma: np.ndarray  # (V,) float32: blur sigma / PIL radius (0 = no blur)


def crop_windows(top, left, height, width, flip) -> np.ndarray:
    """(V, 4) ROI rows for fn.resize; a flip is expressed by swapping the x ends."""
    top, left = np.asarray(top, np.float64), np.asarray(left, np.float64)
    bottom, right = top + np.asarray(height), left + np.asarray(width)
    flip = np.asarray(flip, bool)
    x0 = np.where(flip, right, left)
    x1 = np.where(flip, left, right)
    return np.stack([top, x0, bottom, x1], axis=1).astype(np.float32)


def sample_boxes(spec: ViewSpec, width: int, height: int, rng: np.random.Generator):
    """RandomResizedCrop boxes (top, left, h, w) of every view, torchvision's algorithm, vectorized."""
    V, A = spec.n_views, spec.crop_attempts
    lo = np.array([s[0] for s in spec.scales])[:, None]
    hi = np.array([s[1] for s in spec.scales])[:, None]
    area = float(width) * float(height)
    target = area * (lo + (hi - lo) * rng.random((V, A)))
    log_lo, log_hi = math.log(spec.aspect_ratio[0]), math.log(spec.aspect_ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * rng.random((V, A)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # ties to even, like round()
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = ok.any(axis=1)
    k = ok.argmax(axis=1)
    rows = np.arange(V)
    bw, bh = w[rows, k], h[rows, k]
    top = np.floor(rng.random(V) * (height - np.where(found, bh, 0) + 1)).astype(np.int64)
    left = np.floor(rng.random(V) * (width - np.where(found, bw, 0) + 1)).astype(np.int64)
    if not found.all():
        # Center crop with the aspect ratio clamped into the allowed range (torchvision's fallback).
        in_ratio = width / height
        rmin, rmax = min(spec.aspect_ratio), max(spec.aspect_ratio)
        if in_ratio < rmin:
            fw, fh = width, int(round(width / rmin))
        elif in_ratio > rmax:
            fw, fh = int(round(height * rmax)), height
        else:
            fw, fh = width, height
        nf = ~found
        bw, bh = np.where(nf, fw, bw), np.where(nf, fh, bh)
        top = np.where(nf, (height - fh) // 2, top)
        left = np.where(nf, (width - fw) // 2, left)
    return top, left, bh, bw


def sample_fast(spec: ViewSpec, width: int, height: int, rng: np.random.Generator) -> PackedParams:
    """All views' parameters in a handful of vectorized draws (spec 1.1 distribution)."""
    if width < 1 or height < 1:
        raise ValueError(f"sample_fast: image size must be positive, got {width}x{height}")
    V = spec.n_views
    top, left, bh, bw = sample_boxes(spec, width, height, rng)
    flip = rng.random(V) < spec.flip_prob
    jitter = rng.random(V) < spec.jitter_prob
    order = np.argsort(rng.random((V, 4)), axis=1).astype(np.int32)  # uniform random permutations
    sb, sc, ss, sh = spec.jitter_strength
    factors = np.stack(
        [
            rng.uniform(max(0.0, 1 - sb), 1 + sb, V),
            rng.uniform(max(0.0, 1 - sc), 1 + sc, V),
            rng.uniform(max(0.0, 1 - ss), 1 + ss, V),
            rng.uniform(-sh, sh, V),
        ],
        axis=1,
    )
    identity = np.array([1.0, 1.0, 1.0, 0.0])
    color = np.where(jitter[:, None], factors, identity).astype(np.float32)
    gray = rng.random(V) < spec.grayscale_prob
    blur = rng.random(V) < np.asarray(spec.blur_probs)
    sigma = np.where(blur, rng.uniform(spec.blur_range[0], spec.blur_range[1], V), 0.0).astype(np.float32)
    solarize = rng.random(V) < np.asarray(spec.solarize_probs)
    flags = np.stack([gray, solarize, spec.blur_window(sigma)], axis=1).astype(np.int32)
    return PackedParams(crop_windows(top, left, bh, bw, flip), color, order, flags, sigma)


def pack_crop_params(params: Sequence, spec: ViewSpec) -> PackedParams:
    """Pack a list of ``augment.CropParams`` (one per view) into arrays."""
    if len(params) != spec.n_views:
        raise ValueError(f"pack_crop_params: got {len(params)} crops for {spec.n_views} views")
    color = np.zeros((spec.n_views, 4), np.float32)
    order = np.tile(np.arange(4, dtype=np.int32), (spec.n_views, 1))
    for v, p in enumerate(params):
        if p.size != spec.sizes[v]:
            raise ValueError(f"pack_crop_params: view {v} has size {p.size}, the spec says {spec.sizes[v]}")
        j = p.jitter
        if j is None:
            color[v] = (1.0, 1.0, 1.0, 0.0)
        else:
            color[v] = (j.brightness, j.contrast, j.saturation, j.hue)
            order[v] = j.order
    sigma = np.array([p.blur if p.blur is not None else 0.0 for p in params], np.float32)
    flags = np.stack(
        [
            np.array([p.grayscale for p in params]),
            np.array([p.solarize for p in params]),
            spec.blur_window(sigma),
        ],
        axis=1,
    ).astype(np.int32)
    windows = crop_windows(
        [p.top for p in params], [p.left for p in params], [p.height for p in params],
        [p.width for p in params], [p.flip for p in params],
    )  # fmt: skip
    return PackedParams(windows, color, order, flags, sigma)


def sample_reference(augmentation, spec: ViewSpec, width: int, height: int, rng) -> PackedParams:
    """The torchvision loader's exact parameters (same RNG draws), packed."""
    return pack_crop_params(augmentation.sample_params(width, height, rng), spec)


def unpack_boxes(p: PackedParams) -> List[Tuple[int, int, int, int, bool]]:
    """(top, left, height, width, flip) per view, back from the ROI rows (for tests and reports)."""
    out = []
    for y0, x0, y1, x1 in p.windows.astype(np.float64):
        flip = x0 > x1
        left, right = (x1, x0) if flip else (x0, x1)
        out.append((int(y0), int(left), int(y1 - y0), int(right - left), bool(flip)))
    return out

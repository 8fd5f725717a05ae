"""Explicit-RNG multi-crop augmentation (spec section 1.1): the reference every fast pipeline is compared with.

torchvision's random transforms draw from the global torch RNG, so their output depends on what
else consumed that RNG (worker count, order of samples). Here every random parameter of every crop
is drawn first from an explicit ``numpy.random.Generator`` (:meth:`MultiCropAugmentation.sample_params`)
and then applied with ``torchvision.transforms.functional`` on PIL images (:meth:`apply`); the output
is bit-identical to torchvision's transform classes given the same draws (tested). Splitting the two lets another pipeline (DALI)
replay exactly the same parameters, and lets tests check distributions without decoding anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Fixed by the recipe (spec 1.1); exposed as constants so other pipelines read the same numbers.
ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_PROB = 0.5
JITTER_PROB = 0.8
JITTER_STRENGTH = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
GRAYSCALE_PROB = 0.2
BLUR_RANGE = (0.1, 2.0)
TORCHVISION_BLUR_KERNEL = 9
SOLARIZE_THRESHOLD = 128
CROP_ATTEMPTS = 10

# (blur probability, solarize probability) of each kind of view.
GLOBAL1_POLICY = (1.0, 0.0)
GLOBAL2_POLICY = (0.1, 0.2)
LOCAL_POLICY = (0.5, 0.0)

BLUR_KINDS = ("pil", "torchvision")


@dataclass
class JitterParams:
    # Permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue): the order the ops run in.
    order: Tuple[int, int, int, int]
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass
class CropParams:
    # RandomResizedCrop box in source pixels.
    top: int
    left: int
    height: int
    width: int
    size: int  # output side (square)
    flip: bool
    jitter: Optional[JitterParams]  # None when the p=0.8 jitter did not fire
    grayscale: bool
    blur: Optional[float]  # PIL radius ("pil") or sigma ("torchvision"); None if not applied
    solarize: bool


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    # Same value as rng.uniform(lo, hi) (numpy computes lo + (hi - lo) * random()), without its
    # per-call overhead, which dominated sample_params.
    return lo + (hi - lo) * rng.random()


def sample_crop_box(
    width: int,
    height: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float],
    rng: np.random.Generator,
) -> Tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width), drawn from `rng`.

    Same algorithm as ``torchvision.transforms.RandomResizedCrop.get_params``: up to 10 attempts of a
    uniform area fraction and a log-uniform aspect ratio, then a center crop clamped to `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centered box whose aspect ratio lies inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_jitter(rng: np.random.Generator) -> JitterParams:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) factors and order, torchvision semantics."""
    b, c, s, h = (JITTER_STRENGTH[k] for k in ("brightness", "contrast", "saturation", "hue"))
    order = tuple(int(i) for i in rng.permutation(4))
    return JitterParams(
        order=order,
        brightness=_uniform(rng, max(0.0, 1.0 - b), 1.0 + b),
        contrast=_uniform(rng, max(0.0, 1.0 - c), 1.0 + c),
        saturation=_uniform(rng, max(0.0, 1.0 - s), 1.0 + s),
        hue=_uniform(rng, -h, h),
    )


def apply_jitter(img: Image.Image, j: JitterParams) -> Image.Image:
    for op in j.order:
        if op == 0:
            img = F.adjust_brightness(img, j.brightness)
        elif op == 1:
            img = F.adjust_contrast(img, j.contrast)
        elif op == 2:
            img = F.adjust_saturation(img, j.saturation)
        else:
            img = F.adjust_hue(img, j.hue)
    return img


class MultiCropAugmentation:
    """2 global + `n_local` local crops of one image, each a normalized (3, size, size) float32 tensor."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 10,
        global_scale: Tuple[float, float] = (0.4, 1.0),
        local_scale: Tuple[float, float] = (0.05, 0.4),
        blur: str = "pil",
        blur_sigma: Tuple[float, float] = BLUR_RANGE,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if blur not in BLUR_KINDS:
            raise ValueError(f"MultiCropAugmentation: blur must be one of {BLUR_KINDS}, got {blur!r}")
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if int(size) < 1:
                raise ValueError(f"MultiCropAugmentation: {name} must be >= 1, got {size}")
        if n_local < 0:
            raise ValueError(f"MultiCropAugmentation: n_local must be >= 0, got {n_local}")
        for name, sc in (("global_scale", global_scale), ("local_scale", local_scale)):
            if len(sc) != 2 or not 0 < sc[0] <= sc[1]:
                raise ValueError(f"MultiCropAugmentation: {name} must be (lo, hi) with 0 < lo <= hi, got {tuple(sc)}")
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"MultiCropAugmentation: blur_sigma must be (lo, hi) with 0 < lo <= hi, got {tuple(blur_sigma)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"MultiCropAugmentation: mean/std must have 3 entries and std > 0, got {mean}, {std}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local = int(n_local)
        self.global_scale = tuple(float(x) for x in global_scale)
        self.local_scale = tuple(float(x) for x in local_scale)
        self.blur = blur
        self.blur_sigma = tuple(float(x) for x in blur_sigma)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        # Normalize constants as float32 (3, 1, 1), the dtype torchvision's Normalize computes in.
        self._mean32 = np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std32 = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        self.view_policies: List[Tuple[float, float]] = [GLOBAL1_POLICY, GLOBAL2_POLICY] + [LOCAL_POLICY] * self.n_local

    @classmethod
    def from_config(cls, crops_cfg) -> "MultiCropAugmentation":
        """Build from a ``flashdino.engine.config.CropConfig``. Its blur "auto" is resolved from the
        model style when a whole config is built; a bare CropConfig has none and gets v1's "pil"."""
        return cls(
            global_size=crops_cfg.global_size,
            local_size=crops_cfg.local_size,
            n_local=crops_cfg.n_local,
            global_scale=tuple(crops_cfg.global_scale),
            local_scale=tuple(crops_cfg.local_scale),
            blur="pil" if crops_cfg.blur == "auto" else crops_cfg.blur,
            blur_sigma=tuple(crops_cfg.blur_sigma),
            mean=tuple(crops_cfg.mean),
            std=tuple(crops_cfg.std),
        )

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global {self.global_size} scale {self.global_scale}, "
            f"{self.n_local} x local {self.local_size} scale {self.local_scale}, blur={self.blur} sigma {self.blur_sigma})"
        )

    def _sample_one(self, width, height, size, scale, policy, rng) -> CropParams:
        # Draw order follows torchvision's Compose: box, flip, jitter, grayscale, blur, solarize.
        blur_prob, solarize_prob = policy
        top, left, h, w = sample_crop_box(width, height, scale, ASPECT_RATIO, rng)
        flip = bool(rng.random() < FLIP_PROB)
        jitter = sample_jitter(rng) if rng.random() < JITTER_PROB else None
        grayscale = bool(rng.random() < GRAYSCALE_PROB)
        blur = _uniform(rng, *self.blur_sigma) if rng.random() < blur_prob else None
        solarize = bool(rng.random() < solarize_prob)
        return CropParams(top, left, h, w, size, flip, jitter, grayscale, blur, solarize)

    def sample_params(self, width: int, height: int, rng: np.random.Generator) -> List[CropParams]:
        """Parameters of every crop of one `width` x `height` image: 2 global then `n_local` local."""
        if width < 1 or height < 1:
            raise ValueError(f"MultiCropAugmentation.sample_params: image size must be positive, got {width}x{height}")
        out = []
        for v, policy in enumerate(self.view_policies):
            is_global = v < 2
            size = self.global_size if is_global else self.local_size
            scale = self.global_scale if is_global else self.local_scale
            out.append(self._sample_one(width, height, size, scale, policy, rng))
        return out

    def apply_pil(self, img: Image.Image, p: CropParams) -> Image.Image:
        """Every step before ToTensor, on a PIL RGB image (uint8 all the way, as torchvision does)."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        x = F.resized_crop(
            img, p.top, p.left, p.height, p.width, [p.size, p.size], InterpolationMode.BICUBIC, antialias=True
        )
        if p.flip:
            x = F.hflip(x)
        if p.jitter is not None:
            x = apply_jitter(x, p.jitter)
        if p.grayscale:
            # Same pixels as F.rgb_to_grayscale(x, 3) (ITU-R 601 luma replicated), one PIL call cheaper.
            x = x.convert("L").convert("RGB")
        if p.blur is not None:
            if self.blur == "pil":
                x = x.filter(ImageFilter.GaussianBlur(radius=p.blur))
            else:
                k = TORCHVISION_BLUR_KERNEL
                x = F.gaussian_blur(x, [k, k], [p.blur, p.blur])
        if p.solarize:
            x = F.solarize(x, SOLARIZE_THRESHOLD)
        return x

    def to_normalized_tensor(self, img: Image.Image) -> torch.Tensor:
        """ToTensor + Normalize, bit-identical to torchvision's (the same float32 divide, subtract,
        divide) but in NumPy: for small crops torch's per-op overhead cost 3x more than the math."""
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return torch.from_numpy(np.ascontiguousarray((x - self._mean32) / self._std32))

    def apply(self, img: Image.Image, p: CropParams) -> torch.Tensor:
        """One crop as a (3, size, size) float32 tensor, normalized with mean/std."""
        return self.to_normalized_tensor(self.apply_pil(img, p))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> List[torch.Tensor]:
        params = self.sample_params(img.width, img.height, rng)
        return [self.apply(img, p) for p in params]

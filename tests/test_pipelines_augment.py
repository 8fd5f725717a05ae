"""MultiCropAugmentation against torchvision: exact replay of its transforms, and sampled distributions."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps
from scipy import stats
from torchvision import transforms as T

from flashdino.engine.config import CropConfig
from flashdino.pipelines.augment import (
    CropParams,
    JitterParams,
    MultiCropAugmentation,
    sample_crop_box,
)

PHOTO = "/usr/share/backgrounds/mate/nature/Aqua.jpg"
RATIO = [3.0 / 4.0, 4.0 / 3.0]


@pytest.fixture(scope="module")
def photo():
    # A real photo, shrunk so that a test's dozens of crops stay cheap; not square, so aspect matters.
    with Image.open(PHOTO) as img:
        return img.convert("RGB").resize((150, 100), Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------------------
# Exact equality with torchvision's transform classes under the same random draws
# ------------------------------------------------------------------------------------------------


class _PilBlurV1:
    """The v1 recipe's blur: PIL GaussianBlur, decision and radius from Python's global `random`."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() <= self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class _SolarizeV1:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img, 128) if random.random() < self.p else img


def _torchvision_view(aug, view, flavour):
    """The torchvision Compose the reference recipe builds for crop `view` (v1 or v2 flavour)."""
    blur_p, solarize_p = aug.view_policies[view]
    size = aug.global_size if view < 2 else aug.local_size
    scale = aug.global_scale if view < 2 else aug.local_scale
    steps = [
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if flavour == "v2":
        steps += [T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=blur_p)]
        steps += [T.RandomSolarize(threshold=128, p=solarize_p)]
    else:
        steps += [_PilBlurV1(blur_p)]
        if view == 1:  # v1 has a Solarization step only in the second global pipeline
            steps += [_SolarizeV1(solarize_p)]
    steps += [T.ToTensor(), T.Normalize(aug.mean, aug.std)]
    return T.Compose(steps)


def _replay_params(aug, img, view, flavour):
    """Re-draw, from the same RNG state, the values torchvision's classes draw for one crop."""
    blur_p, solarize_p = aug.view_policies[view]
    size = aug.global_size if view < 2 else aug.local_size
    scale = aug.global_scale if view < 2 else aug.local_scale
    top, left, h, w = T.RandomResizedCrop.get_params(img, list(scale), RATIO)
    flip = bool(torch.rand(1) < 0.5)
    jitter = None
    if not 0.8 < torch.rand(1):
        cj = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        order, b, c, s, hue = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
        jitter = JitterParams(tuple(order.tolist()), b, c, s, hue)
    gray = bool(torch.rand(1) < 0.2)
    if flavour == "v2":
        blur = T.GaussianBlur.get_params(0.1, 2.0) if not blur_p < torch.rand(1) else None
        solarize = torch.rand(1).item() < solarize_p
    else:
        blur = random.uniform(0.1, 2.0) if random.random() <= blur_p else None
        solarize = random.random() < solarize_p if view == 1 else False
    return CropParams(top, left, h, w, size, flip, jitter, gray, blur, solarize)


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_apply_equals_torchvision_transforms_with_same_draws(photo, flavour):
    aug = MultiCropAugmentation(
        global_size=40, local_size=24, n_local=2, blur="pil" if flavour == "v1" else "torchvision"
    )
    seen = {"flip": 0, "jitter": 0, "gray": 0, "blur": 0, "solarize": 0}
    for seed in range(12):
        torch.manual_seed(seed)
        random.seed(seed)
        expected = [_torchvision_view(aug, v, flavour)(photo) for v in range(aug.n_crops)]
        torch.manual_seed(seed)
        random.seed(seed)
        params = [_replay_params(aug, photo, v, flavour) for v in range(aug.n_crops)]
        for v, (p, ref) in enumerate(zip(params, expected)):
            got = aug.apply(photo, p)
            assert got.dtype == torch.float32 and got.shape == ref.shape
            assert torch.equal(got, ref), f"seed {seed} view {v}: {p}"
            seen["flip"] += p.flip
            seen["jitter"] += p.jitter is not None
            seen["gray"] += p.grayscale
            seen["blur"] += p.blur is not None
            seen["solarize"] += p.solarize
    # Every branch of apply was exercised by the comparison, and also left out at least once.
    n = 12 * aug.n_crops
    for name, count in seen.items():
        assert 0 < count < n, f"{name} happened {count}/{n} times: the comparison does not cover both branches"


def test_apply_accepts_grayscale_source_and_is_deterministic(photo):
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=1)
    gray = photo.convert("L")
    params = aug.sample_params(gray.width, gray.height, np.random.default_rng(3))
    a = [aug.apply(gray, p) for p in params]
    b = aug(gray.convert("RGB"), np.random.default_rng(3))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert [t.shape for t in a] == [(3, 32, 32), (3, 32, 32), (3, 16, 16)]


# ------------------------------------------------------------------------------------------------
# Distributions of the sampled parameters (spec 1.1)
# ------------------------------------------------------------------------------------------------


def _binomial_ok(count, n, p, sigmas=5.0):
    if p in (0.0, 1.0):
        return count == n * p
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_per_view_frequencies_match_spec():
    aug = MultiCropAugmentation()  # 2 global + 10 local, the recipe
    rng = np.random.default_rng(1234)
    n = 1500
    all_params = [aug.sample_params(500, 375, rng) for _ in range(n)]
    expected_policy = [(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * 10
    assert aug.view_policies == expected_policy
    for v, (blur_p, sol_p) in enumerate(expected_policy):
        ps = [params[v] for params in all_params]
        counts = {
            "flip": (sum(p.flip for p in ps), 0.5),
            "jitter": (sum(p.jitter is not None for p in ps), 0.8),
            "grayscale": (sum(p.grayscale for p in ps), 0.2),
            "blur": (sum(p.blur is not None for p in ps), blur_p),
            "solarize": (sum(p.solarize for p in ps), sol_p),
        }
        for name, (count, prob) in counts.items():
            assert _binomial_ok(count, n, prob), f"view {v} {name}: {count}/{n}, expected p={prob}"
        assert all(p.size == (224 if v < 2 else 96) for p in ps)


def test_jitter_and_blur_value_distributions():
    aug = MultiCropAugmentation(n_local=10)
    rng = np.random.default_rng(99)
    params = [p for _ in range(600) for p in aug.sample_params(300, 200, rng)]
    jit = [p.jitter for p in params if p.jitter is not None]
    blur = np.array([p.blur for p in params if p.blur is not None])
    for name, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1)):
        vals = np.array([getattr(j, name) for j in jit])
        assert vals.min() >= lo and vals.max() <= hi, name
        assert stats.kstest(vals, "uniform", args=(lo, hi - lo)).pvalue > 1e-3, name
    assert blur.min() >= 0.1 and blur.max() <= 2.0
    assert stats.kstest(blur, "uniform", args=(0.1, 1.9)).pvalue > 1e-3
    # The four ops run in a uniformly random order (all 24 permutations).
    orders = [j.order for j in jit]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    perms = {}
    for o in orders:
        perms[o] = perms.get(o, 0) + 1
    assert len(perms) == 24
    assert stats.chisquare(list(perms.values())).pvalue > 1e-3


def _torchvision_boxes(width, height, scale, n, seed):
    torch.manual_seed(seed)
    dummy = torch.empty(3, height, width)
    return np.array([T.RandomResizedCrop.get_params(dummy, list(scale), RATIO) for _ in range(n)])


def _our_boxes(width, height, scale, n, seed):
    rng = np.random.default_rng(seed)
    return np.array([sample_crop_box(width, height, scale, tuple(RATIO), rng) for _ in range(n)])


@pytest.mark.parametrize(
    "width,height,scale",
    [
        (500, 375, (0.4, 1.0)),  # global crops on an ImageNet-sized image
        (500, 375, (0.05, 0.4)),  # local crops
        (28, 28, (0.1, 0.4)),  # the demo's tiny Fashion-MNIST images: heavy rounding
        (400, 90, (0.4, 1.0)),  # elongated: most attempts fail, fallback path matters
    ],
)
def test_crop_boxes_match_torchvision_distribution(width, height, scale):
    n = 2500
    ours = _our_boxes(width, height, scale, n, seed=7)
    ref = _torchvision_boxes(width, height, scale, n, seed=7)
    for boxes in (ours, ref):
        top, left, h, w = boxes.T
        assert (h >= 1).all() and (w >= 1).all()
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()

    def features(boxes):
        top, left, h, w = boxes.T.astype(np.float64)
        return {
            "area": h * w / (width * height),
            "log_aspect": np.log(w / h),
            "center_y": (top + h / 2) / height,
            "center_x": (left + w / 2) / width,
        }

    f_ours, f_ref = features(ours), features(ref)
    for name in f_ours:
        p = stats.ks_2samp(f_ours[name], f_ref[name]).pvalue
        assert p > 1e-3, f"{name}: KS p-value {p:.2e} between ours and torchvision"


def test_crop_box_fallback_equals_torchvision():
    # Every attempt is too tall for a 1000x10 image at scale >= 0.9: both fall back to a centered box.
    for scale in ((0.9, 1.0), (0.95, 1.0)):
        ours = sample_crop_box(1000, 10, scale, tuple(RATIO), np.random.default_rng(0))
        ref = T.RandomResizedCrop.get_params(torch.empty(3, 10, 1000), list(scale), RATIO)
        assert ours == tuple(ref) == (0, 493, 10, 13)
        ours = sample_crop_box(10, 1000, scale, tuple(RATIO), np.random.default_rng(0))
        ref = T.RandomResizedCrop.get_params(torch.empty(3, 1000, 10), list(scale), RATIO)
        assert ours == tuple(ref)


def test_from_config_and_bad_arguments():
    cfg = CropConfig(global_size=64, local_size=32, n_local=3, blur="torchvision", mean=(0.5, 0.5, 0.5))
    aug = MultiCropAugmentation.from_config(cfg)
    assert (aug.global_size, aug.local_size, aug.n_local, aug.blur) == (64, 32, 3, "torchvision")
    assert aug.mean == (0.5, 0.5, 0.5) and len(aug.view_policies) == 5
    with pytest.raises(ValueError, match="blur"):
        MultiCropAugmentation(blur="gaussian")
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugmentation(local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="n_local"):
        MultiCropAugmentation(n_local=-1)
    for bad in ((0.0, 1.0), (0.5, 0.2), (0.1,)):
        with pytest.raises(ValueError, match="blur_sigma"):
            MultiCropAugmentation(blur_sigma=bad)


@pytest.mark.parametrize("sampler", ["reference", "fast"])
def test_configured_blur_sigma_range_reaches_both_samplers(sampler):
    # A low-res preset shrinks the recipe's (0.1, 2.0); the reference sampler and the DALI one
    # (which replays ViewSpec.blur_range) must both draw uniformly from the configured range.
    from flashdino.pipelines.dali.params import ViewSpec, sample_fast

    aug = MultiCropAugmentation.from_config(CropConfig(global_size=28, local_size=14, n_local=4, blur_sigma=(0.02, 0.3)))
    assert aug.blur_sigma == (0.02, 0.3)
    rng = np.random.default_rng(7)
    if sampler == "reference":
        sig = np.array([p.blur for _ in range(1500) for p in aug.sample_params(28, 28, rng) if p.blur is not None])
    else:
        spec = ViewSpec.from_augmentation(aug)
        assert spec.blur_range == (0.02, 0.3)
        sig = np.concatenate([sample_fast(spec, 28, 28, rng).sigma for _ in range(1500)])
        sig = sig[sig > 0]
    assert len(sig) > 2000
    assert sig.min() >= 0.02 and sig.max() <= 0.3
    assert stats.kstest(sig, "uniform", args=(0.02, 0.28)).pvalue > 1e-3

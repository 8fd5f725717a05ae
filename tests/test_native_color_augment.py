"""The native DALI operator FlashdinoColorAugment against torchvision's functional ops, pixel by pixel.

Reference: ``torchvision.transforms.functional`` on float tensors in [0, 1] (adjust_brightness /
contrast / saturation / hue in the sample's order, rgb_to_grayscale, gaussian_blur, solarize),
then Normalize. Required: max |difference| <= 1/255 before normalization (measured ~1e-6).
The plugin is built once per session with CMake (CPU kernel) into build/native when it is missing
or older than its sources.
"""
import itertools

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as F

from flashdino.pipelines.native import build as native_build

THRESHOLD = 128 / 255


@pytest.fixture(scope="module")
def plugin():
    reason = native_build.missing_requirement("off")
    if reason:
        pytest.skip(f"cannot build the DALI plugin here: {reason}")
    # "auto": with nvcc present (CI, the GPU machine) the one shared build carries the CUDA kernel
    # too; a CPU-only build made here first would be reused, and loaded, by the GPU tests.
    path = native_build.ensure_native_plugin(cuda="auto")
    assert path is not None, "building the DALI plugin failed although cmake, a compiler and DALI are present"
    from flashdino.pipelines.dali import plugin as plugin_mod

    loaded = plugin_mod.load_plugin(path)
    assert loaded is not None and plugin_mod.has_backend("cpu")
    return loaded


def _constant(value):
    return lambda: value


def run_op(images, device="cpu", **args):
    """Run fn.flashdino_color_augment on a batch; per-sample arrays (lists) become argument inputs."""
    from nvidia.dali import pipeline_def, fn

    def is_per_sample(v):
        return isinstance(v, list) and all(isinstance(e, (np.ndarray, np.generic)) for e in v)

    per_sample = {k: v for k, v in args.items() if is_per_sample(v)}
    scalars = {k: v for k, v in args.items() if not is_per_sample(v)}

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=0 if device == "gpu" else None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        if device == "gpu":
            x = x.gpu()
        # (a lambda with a default argument would be handed DALI's batch info)
        kw = {k: fn.external_source(source=_constant(v), batch=True) for k, v in per_sample.items()}
        return fn.flashdino_color_augment(x, **kw, **scalars)

    p = pipe()
    p.build()
    out = p.run()[0]
    if device == "gpu":
        out = out.as_cpu()
    return [np.array(out[i]) for i in range(len(images))]


def reference(img, b=1.0, c=1.0, s=1.0, h=0.0, order=(0, 1, 2, 3), gray=0, sigma=0.0, window=0, solarize=0):
    """torchvision float-tensor semantics; returns (output, pre-solarize image) in [0, 1], CHW."""
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    for op in order:
        if op == 0 and b != 1:
            x = F.adjust_brightness(x, float(b))
        elif op == 1 and c != 1:
            x = F.adjust_contrast(x, float(c))
        elif op == 2 and s != 1:
            x = F.adjust_saturation(x, float(s))
        elif op == 3 and h != 0:
            x = F.adjust_hue(x, float(h))
    if gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if sigma > 0:
        k = window or 2 * max(int(np.ceil(3 * sigma)), 1) + 1
        x = F.gaussian_blur(x, [k, k], [float(sigma), float(sigma)])
    pre = x.clone()
    if solarize:
        x = F.solarize(x, THRESHOLD)
    return x.numpy(), pre.numpy()


def _image(rng, h, w):
    """Noise plus smooth colour gradients: saturated, dark, bright and flat regions all occur."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 128 + 100 * np.sin(xx / 3.0)], -1)
    img = base + rng.normal(0, 40, (h, w, 3))
    img[: h // 4, : w // 4] = rng.integers(0, 256, 3)  # a flat patch (max == min in hue math)
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_params(rng, n, blur_window=None):
    jitter = rng.random(n) < 0.8
    params = dict(
        brightness=[np.float32(rng.uniform(0.6, 1.4)) if j else np.float32(1) for j in jitter],
        contrast=[np.float32(rng.uniform(0.6, 1.4)) if j else np.float32(1) for j in jitter],
        saturation=[np.float32(rng.uniform(0.8, 1.2)) if j else np.float32(1) for j in jitter],
        hue=[np.float32(rng.uniform(-0.1, 0.1)) if j else np.float32(0) for j in jitter],
        jitter_order=[rng.permutation(4).astype(np.int32) for _ in range(n)],
        grayscale=[np.int32(rng.random() < 0.3) for _ in range(n)],
        blur_sigma=[np.float32(rng.uniform(0.1, 2.0)) if rng.random() < 0.5 else np.float32(0) for _ in range(n)],
        solarize=[np.int32(rng.random() < 0.4) for _ in range(n)],
    )
    if blur_window is not None:
        params["blur_window"] = blur_window
    return params


def _ref_of(img, params, i, window=0):
    return reference(
        img, params["brightness"][i], params["contrast"][i], params["saturation"][i], params["hue"][i],
        tuple(params["jitter_order"][i]), params["grayscale"][i], params["blur_sigma"][i], window,
        params["solarize"][i],
    )  # fmt: skip


def _compare(out, ref, pre, solarized):
    """Max |out - ref|, ignoring pixels whose pre-solarize value sits within 1e-5 of the threshold."""
    diff = np.abs(out - ref)
    if solarized:
        diff = np.where(np.abs(pre - THRESHOLD) < 1e-5, 0, diff)
    return diff.max()


@pytest.mark.parametrize("window", [9, 0])
def test_matches_torchvision_pixel_by_pixel(plugin, window):
    rng = np.random.default_rng(100 + window)
    n = 32
    # sizes keep the blur's reflect padding inside the image (torchvision's reflect pad needs that)
    images = [_image(rng, int(rng.integers(14, 48)), int(rng.integers(14, 48))) for _ in range(n)]
    params = _random_params(rng, n, blur_window=window)
    outs = run_op(images, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], **params)
    worst = 0.0
    for i in range(n):
        ref, pre = _ref_of(images[i], params, i, window)
        assert outs[i].shape == ref.shape
        worst = max(worst, _compare(outs[i], ref, pre, params["solarize"][i]))
    assert worst <= 1 / 255, f"max difference {worst * 255:.3f}/255"


def test_every_jitter_order(plugin):
    rng = np.random.default_rng(1)
    img = _image(rng, 24, 31)
    orders = [np.array(p, np.int32) for p in itertools.permutations(range(4))]
    n = len(orders)
    params = dict(
        brightness=[np.float32(1.35)] * n, contrast=[np.float32(0.65)] * n, saturation=[np.float32(1.15)] * n,
        hue=[np.float32(0.08)] * n, jitter_order=orders,
    )  # fmt: skip
    outs = run_op([img] * n, mean=[0.0] * 3, std=[1.0] * 3, **params)
    results = []
    for i, order in enumerate(orders):
        ref, _ = reference(img, 1.35, 0.65, 1.15, 0.08, tuple(order))
        assert np.abs(outs[i] - ref).max() <= 1 / 255, f"order {tuple(order)}"
        results.append(outs[i])
    # the order matters (so the test above could fail): orders give visibly different images
    spread = max(np.abs(results[0] - r).max() for r in results[1:])
    assert spread > 5 / 255


def test_contrast_blends_with_mean_at_its_position(plugin):
    """Brightness before contrast changes the mean contrast blends with (torchvision semantics)."""
    rng = np.random.default_rng(2)
    img = _image(rng, 20, 20)
    first = np.array([0, 1, 2, 3], np.int32)  # brightness, then contrast
    second = np.array([1, 0, 2, 3], np.int32)  # contrast, then brightness
    outs = run_op([img, img], brightness=[np.float32(1.4)] * 2, contrast=[np.float32(0.5)] * 2,
                  jitter_order=[first, second], mean=[0.0] * 3, std=[1.0] * 3)  # fmt: skip
    for out, order in zip(outs, (first, second)):
        ref, _ = reference(img, b=1.4, c=0.5, order=tuple(order))
        assert np.abs(out - ref).max() <= 1 / 255
    assert np.abs(outs[0] - outs[1]).max() > 10 / 255


def test_identity_is_exact_and_normalization_matches(plugin):
    rng = np.random.default_rng(3)
    img = _image(rng, 17, 23)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (out,) = run_op([img], mean=mean, std=std)
    expected = F.normalize(torch.from_numpy(img).permute(2, 0, 1).float() / 255, mean, std).numpy()
    assert np.abs(out - expected).max() < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_outputs(plugin, dtype):
    rng = np.random.default_rng(4)
    n = 6
    images = [_image(rng, 20, 26) for _ in range(n)]
    params = _random_params(rng, n, blur_window=9)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    outs32 = run_op(images, mean=mean, std=std, **params)
    outs = run_op(images, mean=mean, std=std, output_dtype=dtype, **params)
    for o32, o in zip(outs32, outs):
        if dtype == "float16":
            assert o.dtype == np.float16
            got = torch.from_numpy(o.astype(np.float32))
            want = torch.from_numpy(o32).half().float()
        else:
            assert o.dtype == np.uint16  # bfloat16 bits
            got = torch.from_numpy(o).view(torch.bfloat16).float()
            want = torch.from_numpy(o32).bfloat16().float()
        # same rounding of the same float32 value: equal except for rare ties after float32 noise
        ulp = want.abs().clamp(min=1e-3) * (2**-10 if dtype == "float16" else 2**-7)
        assert ((got - want).abs() <= ulp).all()


def test_hwc_layout(plugin):
    rng = np.random.default_rng(5)
    img = _image(rng, 15, 19)
    (chw,) = run_op([img], hue=[np.float32(0.05)], mean=[0.0] * 3, std=[1.0] * 3)
    (hwc,) = run_op([img], hue=[np.float32(0.05)], mean=[0.0] * 3, std=[1.0] * 3, output_layout="HWC")
    assert hwc.shape == (15, 19, 3)
    assert np.array_equal(hwc.transpose(2, 0, 1), chw)


@pytest.mark.parametrize(
    "images,args,match",
    [
        ([np.zeros((8, 8, 3), np.uint8)], dict(jitter_order=[np.array([0, 1, 1, 3], np.int32)]), "permutation"),
        ([np.zeros((8, 8, 3), np.uint8)], dict(blur_sigma=[np.float32(-1)]), "blur_sigma"),
        ([np.zeros((8, 8, 3), np.uint8)], dict(blur_sigma=[np.float32(1)], blur_window=4), "blur_window"),
        ([np.zeros((8, 8, 3), np.uint8)], dict(hue=[np.float32(0.7)]), "hue"),
        ([np.zeros((8, 8, 3), np.uint8)], dict(output_dtype="int8"), "output_dtype"),
        ([np.zeros((8, 8, 1), np.uint8)], dict(), "channels"),
        ([np.zeros((8, 8, 3), np.float32)], dict(), "uint8"),
    ],
)
def test_bad_input_names_the_problem(plugin, images, args, match):
    with pytest.raises(RuntimeError, match=match):
        run_op(images, **args)


@pytest.mark.gpu
def test_cuda_kernel_matches_cpu_kernel():
    """Same batch through the CUDA and the CPU kernel (needs a GPU and a CUDA build of the plugin)."""
    path = native_build.ensure_native_plugin(cuda="on")
    from flashdino.pipelines.dali import plugin as plugin_mod

    plugin_mod.load_plugin(path)
    if not plugin_mod.has_backend("gpu"):
        pytest.skip("the loaded plugin was built without the CUDA kernel")
    rng = np.random.default_rng(6)
    n = 24
    images = [_image(rng, int(rng.integers(14, 60)), int(rng.integers(14, 60))) for _ in range(n)]
    for window in (9, 0):
        params = _random_params(rng, n, blur_window=window)
        for dtype in ("float32", "float16", "bfloat16"):
            cpu = run_op(images, output_dtype=dtype, **params)
            gpu = run_op(images, device="gpu", output_dtype=dtype, **params)
            for c, g in zip(cpu, gpu):
                if dtype == "bfloat16":
                    c = torch.from_numpy(c).view(torch.bfloat16).float().numpy()
                    g = torch.from_numpy(g).view(torch.bfloat16).float().numpy()
                tol = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}[dtype]
                assert np.abs(c.astype(np.float32) - g.astype(np.float32)).max() <= tol
        # and against torchvision directly
        outs = run_op(images, device="gpu", mean=[0.0] * 3, std=[1.0] * 3, **params)
        for i in range(n):
            ref, pre = _ref_of(images[i], params, i, window)
            assert _compare(outs[i], ref, pre, params["solarize"][i]) <= 1 / 255

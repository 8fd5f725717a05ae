"""The DALI graph of the multi-crop pipeline.

    external source (bytes or pixels, per-view parameters)        CPU, optional worker processes
      -> decoders.image(device='mixed' on GPU: nvJPEG / hardware JPEG decoder; 'cpu' otherwise)
      -> per view: resize with the crop window as ROI (bicubic, antialiased; the flip is the ROI's
         reversed x range, so crop + flip + resize is one op). Unlike torchvision's crop-then-resize,
         the filter reads the pixels just outside the window: a window upscaled many times (a
         30x45 box to 224 px) differs in its outer few pixels (measured: 7/255 on average over a
         4-pixel border); at the recipe's sizes the crops differ by ~0.2/255 on average.
      -> per view: FlashdinoColorAugment (jitter in per-sample order, grayscale, blur, solarize,
         normalize, CHW, cast) -- or, without the plugin, DALI's built-in chain
    outputs: one (B, 3, S, S) batch per view, meta (label, index used), skipped indices

Every random number is drawn by the source (per-sample RNGs), none by DALI, so the output does
not depend on DALI's thread count or scheduling.
"""
from __future__ import annotations

import pickle
from typing import Optional, Sequence, Tuple

from ..worker_signals import ignore_stop_signals
from .source import OUTPUT_NAMES, MultiCropSource

OUT_DTYPES = ("float32", "float16", "bfloat16")


class WorkerPickler:
    """DALI's ``py_callback_pickler`` for spawned workers: plain pickle (the source is a plain
    picklable object), and, in each worker as it unpickles its callback at start, the stop signals
    left to the main process (``pipelines/worker_signals.py``). DALI offers no other hook that
    runs in its workers."""

    @staticmethod
    def dumps(obj, protocol=None, **kwargs) -> bytes:
        return pickle.dumps(obj, protocol, **kwargs)

    @staticmethod
    def loads(data: bytes, **kwargs):
        ignore_stop_signals()
        return pickle.loads(data, **kwargs)  # nosec B301: our own source object, from our own process


def _builtin_chain(crop, color, order, flags, sigma, v, mean, std, out_dtype, on_gpu):
    """DALI built-in ops for one view: fixed jitter order, YIQ hue/saturation, mid-gray contrast."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    gray = flags[v, 0]
    # Grayscale after the jitter == saturation 0 in YIQ (Y has torchvision's luma weights).
    saturation = color[v, 2] * fn.cast(1 - gray, dtype=types.FLOAT)
    x = fn.color_twist(crop, brightness=color[v, 0], contrast=color[v, 1], saturation=saturation,
                       hue=color[v, 3] * 360.0)  # fmt: skip
    # Window 1 leaves a sample untouched, so blur needs no per-sample branch; sigma must still be
    # positive there, and a floor far below any configured crops.blur_sigma keeps the blurred ones exact.
    x = fn.gaussian_blur(x, sigma=dmath.max(sigma[v], 1e-3), window_size=flags[v, 2])
    solarize = flags[v, 1]
    if on_gpu:
        solarize = solarize.gpu()
    xi = fn.cast(x, dtype=types.INT32)
    inverted = (xi >= 128) * solarize
    x = fn.cast(xi + inverted * (255 - 2 * xi), dtype=types.UINT8)
    dali_dtype = types.FLOAT16 if out_dtype == "float16" else types.FLOAT
    return fn.crop_mirror_normalize(
        x, dtype=dali_dtype, output_layout="CHW",
        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
    )  # fmt: skip


def build_pipeline(
    source: MultiCropSource,
    *,
    device_id: Optional[int],
    num_threads: int = 4,
    py_workers: int = 0,
    prefetch: int = 2,
    out_dtype: str = "float32",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    use_plugin: bool = True,
    hw_decoder_load: float = 0.9,
    py_start_method: str = "spawn",
) -> Tuple[object, Tuple[str, ...]]:
    """Build (not start) the pipeline; returns it with the names of its outputs.

    device_id None: everything on the CPU (tests, DALI-CPU benchmark). py_workers 0: the source runs
    in the main process. out_dtype "bfloat16" with the plugin gives uint16 bits (view them as
    bfloat16); with the built-in chain it gives float32 (cast afterwards).
    """
    from nvidia.dali import Pipeline
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"build_pipeline: out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")
    on_gpu = device_id is not None
    spec = source.spec
    kwargs = dict(
        batch_size=source.batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=source.seed,  # unused by the graph (no DALI random ops); fixed for good measure
        # The dynamic executor: what run(cuda_stream) needs to return outputs on torch's stream
        # (DALI 2.4's default, asked for explicitly so that another wheel does not change it).
        exec_dynamic=True,
    )
    if py_workers > 0:
        kwargs.update(py_num_workers=py_workers, py_start_method=py_start_method)
        if py_start_method == "spawn":  # forked workers share the source and take no pickler
            kwargs.update(py_callback_pickler=WorkerPickler)
    pipe = Pipeline(**kwargs)
    with pipe:
        layouts = ["HWC" if not source.encoded else None] + [None] * (len(OUTPUT_NAMES) - 1)
        data, meta, windows, color, order, flags, sigma, skipped = fn.external_source(
            source=source,
            num_outputs=len(OUTPUT_NAMES),
            batch=False,
            parallel=py_workers > 0,
            layout=layouts,
        )
        if source.encoded:
            decode_args = dict(output_type=types.RGB, adjust_orientation=False)
            if on_gpu:
                decode_args["hw_decoder_load"] = hw_decoder_load
            images = fn.decoders.image(data, device="mixed" if on_gpu else "cpu", **decode_args)
        else:
            images = data.gpu() if on_gpu else data
        views = []
        for v in range(spec.n_views):
            size = spec.sizes[v]
            crop = fn.resize(
                images, roi_start=windows[v, 0:2], roi_end=windows[v, 2:4], roi_relative=False,
                size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True, dtype=types.UINT8,
            )  # fmt: skip
            if use_plugin:
                out = fn.flashdino_color_augment(
                    crop,
                    brightness=color[v, 0], contrast=color[v, 1], saturation=color[v, 2], hue=color[v, 3],
                    jitter_order=order[v], grayscale=flags[v, 0], solarize=flags[v, 1],
                    blur_window=flags[v, 2], blur_sigma=sigma[v],
                    mean=[float(m) for m in mean], std=[float(s) for s in std],
                    output_dtype=out_dtype, output_layout="CHW",
                )  # fmt: skip
            else:
                out = _builtin_chain(crop, color, order, flags, sigma, v, mean, std, out_dtype, on_gpu)
            views.append(out)
        pipe.set_outputs(*views, meta, skipped)
    names = tuple(f"view{v}" for v in range(spec.n_views)) + ("meta", "skipped")
    return pipe, names

"""Batched, streamed feature extraction from a frozen backbone (spec section 5).

Images go through the evaluation transform (resize the shorter side, center crop, normalize), the
backbone runs in eval mode without gradients, and each batch's features are written straight into
one preallocated (N, D) buffer (in memory, or a ``.npy`` memory map on disk for ImageNet-scale
sets), so no list of per-batch tensors and no images are ever held.

Datasets holding their pixels as an array (Fashion-MNIST's ``.images``) are transformed in whole
batches with NumPy, which gives the same values as the per-image PIL path (tested) at a fraction
of the cost. Images that fail to decode are left out of the result and counted, with their paths.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .backbone import prepared_for_eval

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

FeatureFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------
# transform
# ------------------------------------------------------------------------------------------
class EvalTransform:
    """Resize the shorter side to `resize_size` (bicubic) -> center crop `size` -> ToTensor -> Normalize.

    The spec 5 evaluation preprocessing (256 -> 224 for ImageNet). Pixel maths are float32 in the
    order torchvision uses (divide by 255, subtract the mean, divide by the std)."""

    def __init__(self, size: int = 224, resize_size: int = 256, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        if size < 1 or resize_size < size:
            raise ValueError(f"EvalTransform: need 1 <= size <= resize_size, got size={size}, resize_size={resize_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"EvalTransform: mean/std need 3 entries and std > 0, got {tuple(mean)}, {tuple(std)}")
        self.size, self.resize_size = int(size), int(resize_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean32 = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._std32 = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1)

    @classmethod
    def from_config(cls, cfg, size: Optional[int] = None, resize_size: Optional[int] = None) -> "EvalTransform":
        """From a run's config: eval sizes from ``cfg.eval``, mean/std from ``cfg.crops`` (what training used).

        A crop `size` given without `resize_size` keeps the config's resize-to-crop ratio (224 -> 256
        with the spec's 256/224), so asking for another crop size never silently drops the center crop.
        """
        if size and not resize_size:
            resize_size = round(size * cfg.eval.resize_size / cfg.eval.eval_size)
        return cls(size or cfg.eval.eval_size, resize_size or cfg.eval.resize_size, cfg.crops.mean, cfg.crops.std)

    def __repr__(self) -> str:
        return f"EvalTransform(resize {self.resize_size} -> center crop {self.size}, mean={self.mean}, std={self.std})"

    def identity_geometry(self, height: int, width: int) -> bool:
        """True when resize and crop leave a `height` x `width` image untouched."""
        return height == width == self.size == self.resize_size

    def pil_geometry(self, img: Image.Image) -> Image.Image:
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.identity_geometry(img.height, img.width):
            return img
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        img = F.resize(img, self.resize_size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        return F.center_crop(img, [self.size, self.size])

    def normalize_uint8(self, pixels: np.ndarray) -> torch.Tensor:
        """(B, H, W, 3) or (B, H, W) uint8 -> normalized float32 (B, 3, H, W)."""
        x = np.asarray(pixels)
        if x.ndim == 3:  # grayscale: replicate to RGB as PIL's convert("RGB") does
            x = np.repeat(x[..., None], 3, axis=-1)
        x = x.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
        return torch.from_numpy(np.ascontiguousarray((x - self._mean32) / self._std32))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize_uint8(np.asarray(self.pil_geometry(img))[None])[0]


# ------------------------------------------------------------------------------------------
# datasets of transformed images
# ------------------------------------------------------------------------------------------
class EvalImages(torch.utils.data.Dataset):
    """``dataset[i] -> (image tensor, label, ok)`` for any reader with ``load(i) -> (PIL, label)``.

    A file that cannot be decoded gives a zero image with ``ok = False``; the extractor drops those
    rows and reports them."""

    def __init__(self, reader, transform: EvalTransform):
        self.reader, self.transform = reader, transform

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        from flashdino.pipelines.datasets import CorruptImageError

        try:
            img, label = self.reader.load(index)
        except CorruptImageError:
            size = self.transform.size
            return torch.zeros(3, size, size), -1, False
        return self.transformed(img, index), int(label), True

    def transformed(self, img, index: int) -> torch.Tensor:
        """The image as a normalized tensor (subclasses may draw per-index randomness)."""
        return self.transform(img)


def has_pixel_array(reader, transform: EvalTransform) -> bool:
    """Whether `reader` keeps uint8 pixels in ``.images`` that `transform` can use without resampling."""
    images = getattr(reader, "images", None)
    return (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4)
            and transform.identity_geometry(images.shape[1], images.shape[2]))


def iterate_batches(reader, transform: EvalTransform, batch_size: int, num_workers: int = 0,
                    indices: Optional[Sequence[int]] = None):
    """Yield ``(images, labels, ok)`` batches of `reader` in index order (or the order of `indices`)."""
    order = np.arange(len(reader)) if indices is None else np.asarray(indices, dtype=np.int64)
    if has_pixel_array(reader, transform):
        labels = np.asarray(reader.labels, dtype=np.int64)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            images = transform.normalize_uint8(reader.images[idx])
            yield images, torch.from_numpy(labels[idx]), torch.ones(len(idx), dtype=torch.bool)
        return
    dataset = EvalImages(reader, transform)
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, order.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=False)
    for images, labels, ok in loader:
        yield images, labels.long(), ok.bool()


# ------------------------------------------------------------------------------------------
# what a backbone gives per image
# ------------------------------------------------------------------------------------------
def cls_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The CLS token after the final LayerNorm (k-NN features, spec 5.1/5.2)."""
    return backbone.forward_features(images)["cls"]


def compute_features(feature_fn: FeatureFn, backbone: torch.nn.Module, images: torch.Tensor,
                     amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """`feature_fn` on `images`, under autocast to `amp_dtype` when one is given, as float32."""
    if amp_dtype is None:
        return feature_fn(backbone, images).float()
    with torch.autocast(images.device.type, dtype=amp_dtype):
        return feature_fn(backbone, images).float()


def multi_block_features(n_last_blocks: int, avgpool: bool) -> FeatureFn:
    """CLS tokens of the last `n_last_blocks` blocks (each through the final LayerNorm), in block
    order, followed with `avgpool` by the mean of the last block's normed patch tokens (registers
    excluded): the linear-probe features of spec 5.3/5.4, ``(n_last_blocks + avgpool) * D`` wide."""

    def fn(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        outputs = backbone.get_intermediate_layers(images, n_last_blocks, norm=True)
        parts = [out[:, 0] for out in outputs]
        if avgpool:
            prefix = getattr(backbone, "num_prefix_tokens", 1)
            parts.append(outputs[-1][:, prefix:].mean(dim=1))
        return torch.cat(parts, dim=-1)

    return fn


# ------------------------------------------------------------------------------------------
# extraction
# ------------------------------------------------------------------------------------------
@dataclass
class FeatureSet:
    features: torch.Tensor  # (N, D), rows of the images that decoded, in dataset order
    labels: torch.Tensor  # (N,) int64; -1 for unlabeled images
    indices: torch.Tensor  # (N,) dataset index of each row
    failed_paths: List[str] = field(default_factory=list)  # images left out (could not be decoded)

    def __len__(self) -> int:
        return self.features.shape[0]


def _allocate(n: int, dim: int, dtype: torch.dtype, out_path: Optional[str]) -> torch.Tensor:
    if out_path is None:
        return torch.empty(n, dim, dtype=dtype)
    from numpy.lib.format import open_memmap

    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}.get(dtype)
    if np_dtype is None:
        raise ValueError(f"extract_features: a memory-mapped feature file cannot hold {dtype}; use float32 or float16")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    return torch.from_numpy(open_memmap(out_path, mode="w+", dtype=np_dtype, shape=(n, dim)))


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    reader,
    transform: EvalTransform,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
    feature_fn: FeatureFn = cls_features,
    normalize: bool = False,
    dtype: torch.dtype = torch.float32,
    amp_dtype: Optional[torch.dtype] = None,
    out_path: Optional[str] = None,
    indices: Optional[Sequence[int]] = None,
    progress: Optional[str] = None,
) -> FeatureSet:
    """Features of every image of `reader` (or of `indices`), streamed into one (N, D) buffer.

    `normalize` L2-normalizes each row (k-NN). `amp_dtype` runs the backbone under autocast (v2
    protocol: fp16); the default is fp32 without autocast (v1 protocol). `out_path` stores the
    buffer as a ``.npy`` memory map instead of RAM. `progress` is a label for a progress bar."""
    if batch_size < 1:
        raise ValueError(f"extract_features: batch_size must be >= 1, got {batch_size}")
    n = len(reader) if indices is None else len(indices)
    if n == 0:
        raise ValueError(f"extract_features: the dataset {reader!r} is empty")
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    buffer: Optional[torch.Tensor] = None
    labels = torch.empty(n, dtype=torch.long)
    ok_mask = torch.empty(n, dtype=torch.bool)
    bar = _progress_bar(progress, math.ceil(n / batch_size))
    row = 0
    with prepared_for_eval(backbone, amp_dtype):  # eager blocks; SDPA for half-only kernels in fp32
        try:
            for images, batch_labels, ok in iterate_batches(reader, transform, batch_size, num_workers, indices):
                images = images.to(device, non_blocking=True)
                feats = compute_features(feature_fn, backbone, images, amp_dtype)
                if normalize:
                    feats = torch.nn.functional.normalize(feats, dim=-1)
                if buffer is None:
                    buffer = _allocate(n, feats.shape[1], dtype, out_path)
                b = feats.shape[0]
                buffer[row:row + b] = feats.to("cpu", dtype)
                labels[row:row + b] = batch_labels
                ok_mask[row:row + b] = ok
                row += b
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            backbone.train(was_training)
    order = torch.arange(n) if indices is None else torch.as_tensor(np.asarray(indices, dtype=np.int64))
    failed = [] if bool(ok_mask.all()) else [reader.path(int(i)) for i in order[~ok_mask]]
    if failed:
        print(f"[flashdino] {len(failed)} image(s) could not be decoded and were left out of the features; "
              f"first: {', '.join(failed[:5])}", file=sys.stderr)
        keep = ok_mask.nonzero().flatten()
        _compact_rows(buffer, keep)
        buffer, labels, order = buffer[: len(keep)], labels[keep], order[keep]
    return FeatureSet(buffer, labels, order, failed)


def _compact_rows(buffer: torch.Tensor, keep: torch.Tensor, chunk: int = 65536) -> None:
    """Move rows `keep` (ascending) to the front of `buffer` in place, chunk by chunk, so a
    memory-mapped buffer is never copied whole into RAM. Safe because every row moves up or stays."""
    for start in range(0, len(keep), chunk):
        idx = keep[start:start + chunk]
        buffer[start:start + len(idx)] = buffer[idx]


def _progress_bar(label: Optional[str], total: int):
    if not label:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="batch", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not sys.stderr.isatty() and os.environ.get("FLASHDINO_PROGRESS") != "1")


RAW_PIXEL_CENTERING = ("image", "none")


def raw_pixel_features(reader, transform: EvalTransform, batch_size: int = 1024, center: str = "image") -> FeatureSet:
    """Flattened normalized pixels as features (the raw-pixel k-NN baseline).

    ``center="image"`` subtracts each image's own mean pixel value, so cosine similarity compares
    the images' contrast patterns (the protocol behind the 85.2% weighted 20-NN figure for
    Fashion-MNIST in shared/DATA.md; the common per-channel Normalize then drops out of the cosine).
    Rows are not L2-normalized here (``knn`` does it). Grayscale pixel arrays give one channel
    (the RGB copies would only repeat it)."""
    if center not in RAW_PIXEL_CENTERING:
        raise ValueError(f"raw_pixel_features: center must be one of {RAW_PIXEL_CENTERING}, got {center!r}")
    n = len(reader)
    buffer = None
    labels = torch.empty(n, dtype=torch.long)
    row = 0
    gray = has_pixel_array(reader, transform) and reader.images.ndim == 3
    for images, batch_labels, ok in iterate_batches(reader, transform, batch_size):
        if not bool(ok.all()):
            raise ValueError("raw_pixel_features: some images could not be decoded; the baseline needs them all")
        flat = (images[:, :1] if gray else images).flatten(1)
        if center == "image":
            flat = flat - flat.mean(dim=1, keepdim=True)
        if buffer is None:
            buffer = torch.empty(n, flat.shape[1], dtype=torch.float32)
        buffer[row:row + len(flat)] = flat
        labels[row:row + len(flat)] = batch_labels
        row += len(flat)
    return FeatureSet(buffer, labels, torch.arange(n))

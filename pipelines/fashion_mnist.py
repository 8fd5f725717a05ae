"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (the embedded default data set).

Reads the original idx files (gzip): a big-endian header (magic, counts, sizes), then uint8 data —
images at byte 16, labels at byte 8. Everything is loaded into memory once (47 MB for train).
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from PIL import Image

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (as root), or without apt's database: "
    "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb DEST` and pass "
    "DEST/usr/share/datasets/fashion-mnist as the root (data.path)"
)


class FashionMNISTFormatError(ValueError):
    """An idx file's header or size does not match the Fashion-MNIST format."""


def _read_idx(path: str, magic: int, n_dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    header_size = 4 + 4 * n_dims
    if len(data) < header_size:
        raise FashionMNISTFormatError(f"{path}: file is shorter than its {header_size}-byte idx header")
    found_magic, *dims = struct.unpack(">" + "I" * (1 + n_dims), data[:header_size])
    if found_magic != magic:
        raise FashionMNISTFormatError(f"{path}: idx magic number is {found_magic}, expected {magic}")
    expected = int(np.prod(dims))
    if len(data) - header_size != expected:
        raise FashionMNISTFormatError(
            f"{path}: header says {dims} ({expected} bytes of data) but the file holds {len(data) - header_size}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


class FashionMNIST:
    """Fashion-MNIST split as 28x28 images converted to RGB; raw arrays in `images` and `labels`."""

    def __init__(self, root: str = DEFAULT_ROOT, split: str = "train"):
        if split not in SPLIT_PREFIX:
            raise ValueError(f"FashionMNIST: split must be one of {tuple(SPLIT_PREFIX)}, got {split!r}")
        prefix = SPLIT_PREFIX[split]
        self.root = root
        self.split = split
        self.images_file = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
        self.labels_file = os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")
        missing = [p for p in (self.images_file, self.labels_file) if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"Fashion-MNIST file(s) not found: {', '.join(missing)}. To get them, {INSTALL_HINT}")
        self.images: np.ndarray = _read_idx(self.images_file, IMAGES_MAGIC, 3)  # (N, 28, 28) uint8
        self.labels: np.ndarray = _read_idx(self.labels_file, LABELS_MAGIC, 1).astype(np.int64)  # (N,)
        if len(self.images) != len(self.labels):
            raise FashionMNISTFormatError(
                f"Fashion-MNIST {split}: {len(self.images)} images but {len(self.labels)} labels"
            )
        self.classes = CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, root={self.root!r})"

    def load(self, index: int):
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.labels[index])

    def path(self, index: int) -> str:
        return f"{self.images_file}#{index}"

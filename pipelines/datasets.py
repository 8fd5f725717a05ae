"""Image readers behind one small interface.

Every dataset has ``__len__``, ``load(index) -> (PIL RGB image, label)`` (label -1 when unlabeled)
and ``path(index) -> str``. A file that cannot be decoded completely raises
:class:`CorruptImageError`; the loader skips it, substitutes another sample and reports the path.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image

from .fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from .fashion_mnist import FashionMNIST

# torchvision's ImageFolder list, plus the case-insensitive match it also does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_FILE = "train-images-idx3-ubyte.gz"

__all__ = [
    "IMG_EXTENSIONS",
    "CorruptImageError",
    "DatasetError",
    "decode_image",
    "is_image_file",
    "ImageFolderDataset",
    "UnlabeledFolderDataset",
    "FileListDataset",
    "FashionMNIST",
    "SyntheticDataset",
    "detect_layout",
    "build_dataset",
]


class CorruptImageError(Exception):
    """A file that is missing, empty, truncated or not an image."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image '{path}': {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) when raised inside a DataLoader worker
        return (CorruptImageError, (self.path, self.reason))


class DatasetError(ValueError):
    """A dataset location or list that cannot be used (missing, empty, malformed)."""


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def decode_image(path: str) -> Image.Image:
    """Open and fully decode `path` as RGB.

    ``Image.verify`` only checks the container, so the pixel data is decoded here; truncated files
    fail because ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default (False).
    """
    try:
        if os.path.getsize(path) == 0:
            raise CorruptImageError(path, "file is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except CorruptImageError:
        raise
    except FileNotFoundError:
        raise CorruptImageError(path, "file does not exist") from None
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(path, f"refused by PIL's decompression-bomb check ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # PIL reports unknown formats as UnidentifiedImageError (an OSError), truncation as OSError,
        # and some malformed headers as SyntaxError/ValueError.
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from None


def _walk_images(root: str) -> Tuple[List[str], int]:
    """Image files below `root` (sorted, recursive, following links) and how many other files were ignored."""
    images, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image_file(name):
                images.append(os.path.join(dirpath, name))
            else:
                ignored += 1
    return images, ignored


class _FileDataset:
    """Shared behaviour of datasets backed by a list of image files."""

    files: List[str]
    labels: List[int]
    n_ignored_files: int = 0  # non-image files found and not used (counted, so nothing vanishes unnoticed)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int):
        return decode_image(self.files[index]), self.labels[index]

    def path(self, index: int) -> str:
        return self.files[index]


class ImageFolderDataset(_FileDataset):
    """ImageNet-style tree: root/<class>/**/<image>; classes sorted by name give labels 0..C-1."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise DatasetError(f"ImageFolderDataset: '{root}' is not a directory")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise DatasetError(f"ImageFolderDataset: '{root}' has no class sub-folders")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.files, self.labels = [], []
        empty = []
        for c in self.classes:
            found, ignored = _walk_images(os.path.join(root, c))
            self.n_ignored_files += ignored
            if not found:
                empty.append(c)
            self.files.extend(found)
            self.labels.extend([self.class_to_idx[c]] * len(found))
        if empty:
            raise DatasetError(
                f"ImageFolderDataset: class folder(s) without any image ({', '.join(IMG_EXTENSIONS)}) in '{root}': "
                f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}"
            )

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, n={len(self)}, classes={len(self.classes)})"


class UnlabeledFolderDataset(_FileDataset):
    """Every image file below `root`, recursively, with label -1."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise DatasetError(f"UnlabeledFolderDataset: '{root}' is not a directory")
        self.root = root
        self.files, self.n_ignored_files = _walk_images(root)
        if not self.files:
            raise DatasetError(f"UnlabeledFolderDataset: no image files ({', '.join(IMG_EXTENSIONS)}) below '{root}'")
        self.labels = [-1] * len(self.files)

    def __repr__(self) -> str:
        return f"UnlabeledFolderDataset(root={self.root!r}, n={len(self)})"


class FileListDataset(_FileDataset):
    """A text file with one image per line: ``path`` or ``path label``.

    Relative paths are relative to the list file's folder. Blank lines and lines starting with '#'
    are skipped. Missing files surface as CorruptImageError when loaded (so they are skipped and
    reported), except that a list whose first entry is missing is rejected at once: that is
    almost always a wrong base folder.
    """

    def __init__(self, list_file: str):
        if not os.path.isfile(list_file):
            raise DatasetError(f"FileListDataset: list file '{list_file}' does not exist")
        self.list_file = list_file
        base = os.path.dirname(os.path.abspath(list_file))
        self.files, self.labels = [], []
        with open(list_file) as fh:
            for line_no, raw in enumerate(fh, 1):
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                path, label = line, -1
                parts = line.rsplit(None, 1)
                if len(parts) == 2:
                    try:
                        label = int(parts[1])
                        path = parts[0]
                    except ValueError:
                        pass  # no label column: the whole line is the path
                if label < -1:
                    raise DatasetError(f"FileListDataset: {list_file}:{line_no}: label must be >= 0 (or absent), got {label}")
                self.files.append(path if os.path.isabs(path) else os.path.join(base, path))
                self.labels.append(label)
        if not self.files:
            raise DatasetError(f"FileListDataset: '{list_file}' lists no files")
        if not os.path.exists(self.files[0]):
            raise DatasetError(
                f"FileListDataset: first entry of '{list_file}' does not exist: '{self.files[0]}' "
                f"(relative paths are resolved against '{base}')"
            )

    def __repr__(self) -> str:
        return f"FileListDataset(list_file={self.list_file!r}, n={len(self)})"


class SyntheticDataset:
    """Deterministic random RGB images with labels in 0..n_classes-1 (tests and benchmarks).

    Each image is low-resolution noise upscaled bicubically plus a class-dependent colour, so crops
    have structure and the classes are separable; image i depends only on (seed, i).
    """

    def __init__(self, n: int, size: int = 64, seed: int = 0, n_classes: int = 10, split: str = "train"):
        if n < 1 or size < 1 or n_classes < 1:
            raise ValueError(f"SyntheticDataset: n, size and n_classes must be >= 1, got {n}, {size}, {n_classes}")
        self.n, self.size, self.seed, self.n_classes = int(n), int(size), int(seed), int(n_classes)
        # The class colours depend on the seed only, so a train and a test split share their classes;
        # the images themselves differ by split.
        self._image_seed = [self.seed] if split == "train" else [self.seed, 1]
        palette_rng = np.random.default_rng(np.random.SeedSequence([self.seed, 2**31 - 1]))
        self._palette = palette_rng.uniform(40, 215, size=(self.n_classes, 3))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"SyntheticDataset(n={self.n}, size={self.size}, seed={self.seed})"

    def load(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(f"SyntheticDataset: index {index} out of range [0, {self.n})")
        rng = np.random.default_rng(np.random.SeedSequence(self._image_seed + [index]))
        label = int(index % self.n_classes)
        coarse = max(2, self.size // 8)
        noise = rng.normal(0.0, 45.0, size=(coarse, coarse, 3)) + self._palette[label]
        small = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8))
        return small.resize((self.size, self.size), Image.Resampling.BICUBIC), label

    def path(self, index: int) -> str:
        return f"synthetic://{self.seed}/{index}"


def _has_image_file(folder: str) -> bool:
    try:
        return any(e.is_file() and is_image_file(e.name) for e in os.scandir(folder))
    except OSError:
        return False


def detect_layout(path: Optional[str]) -> str:
    """The dataset kind `path` looks like: fashion_mnist, imagefolder, folder or filelist."""
    if path is None:
        return "fashion_mnist"
    if os.path.isfile(path):
        if path.lower().endswith(".txt"):
            return "filelist"
        raise DatasetError(f"data.path '{path}' is a file but not a .txt file list")
    if not os.path.isdir(path):
        raise DatasetError(f"data.path '{path}' does not exist")
    if os.path.isfile(os.path.join(path, FASHION_MNIST_FILE)):
        return "fashion_mnist"
    subdirs = sorted(e.path for e in os.scandir(path) if e.is_dir())
    # Images directly in `path` mean it is not a class tree, even if some sub-folders hold images too.
    if not _has_image_file(path) and any(_has_image_file(d) for d in subdirs):
        return "imagefolder"
    for _ in _iter_images(path):
        return "folder"
    raise DatasetError(f"data.path '{path}' holds no image files ({', '.join(IMG_EXTENSIONS)}) at any depth")


def _iter_images(root: str):
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            if is_image_file(name):
                yield os.path.join(dirpath, name)


def build_dataset(data_cfg, split: str = "train", seed: int = 0):
    """The dataset `data_cfg` (a ``flashdino.engine.config.DataConfig``) names.

    ``data.dataset = auto`` picks: no path -> Fashion-MNIST; a folder with the Fashion-MNIST files ->
    Fashion-MNIST; a folder whose immediate sub-folders hold images (and no images of its own) ->
    class tree; any other folder with images below it -> unlabeled folder; a .txt file -> file list.
    `split` selects the Fashion-MNIST split (train/test), the synthetic set's seed offset, and for
    folders a sub-folder named after it when one exists (``path/train`` of an ImageNet-style root).
    """
    kind = data_cfg.dataset
    path = data_cfg.path
    if kind in ("auto", "imagefolder", "folder") and path and os.path.isdir(os.path.join(path, split)):
        path = os.path.join(path, split)  # an ImageNet-style root holding train/ and val/
    if kind == "auto":
        kind = detect_layout(path)
    if kind == "fashion_mnist":
        return FashionMNIST(root=path or FASHION_MNIST_ROOT, split=split)
    if kind == "synthetic":
        return SyntheticDataset(data_cfg.synthetic_size, seed=seed, split=split)
    if path is None:
        raise DatasetError(f"data.dataset={kind} needs data.path")
    if not os.path.exists(path):
        raise DatasetError(f"data.path '{path}' does not exist")
    if kind == "imagefolder":
        return ImageFolderDataset(path)
    if kind == "folder":
        return UnlabeledFolderDataset(path)
    if kind == "filelist":
        return FileListDataset(path)
    raise DatasetError(f"unknown data.dataset '{kind}'")

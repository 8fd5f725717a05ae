"""Dataset readers: layouts, corrupt files, Fashion-MNIST (real files and missing package), auto detection."""
import gzip
import os
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from flashdino.engine.config import DataConfig
from flashdino.pipelines.datasets import (
    CorruptImageError,
    DatasetError,
    FashionMNIST,
    FileListDataset,
    ImageFolderDataset,
    SyntheticDataset,
    UnlabeledFolderDataset,
    build_dataset,
    decode_image,
    detect_layout,
)
from flashdino.pipelines.fashion_mnist import DEFAULT_ROOT, FashionMNISTFormatError

HAS_FASHION_MNIST = os.path.isfile(os.path.join(DEFAULT_ROOT, "train-images-idx3-ubyte.gz"))
needs_fmnist = pytest.mark.skipif(not HAS_FASHION_MNIST, reason="dataset-fashion-mnist is not installed")


def _save_image(path, seed=0, size=(20, 16), mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)
    return img


def _write_corrupt_files(folder):
    """A truncated JPEG, a text file named .jpg and an empty .png; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    full = os.path.join(folder, "full.jpg")
    _save_image(full, seed=9, size=(64, 48))
    data = open(full, "rb").read()
    os.remove(full)
    truncated = os.path.join(folder, "truncated.jpg")
    with open(truncated, "wb") as fh:
        fh.write(data[: len(data) // 2])
    text = os.path.join(folder, "notes.jpg")
    with open(text, "w") as fh:
        fh.write("this is not an image\n")
    empty = os.path.join(folder, "empty.png")
    open(empty, "wb").close()
    return truncated, text, empty


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------


def test_decode_valid_images_as_rgb(tmp_path):
    rgb = _save_image(str(tmp_path / "a.png"), seed=1)
    out = decode_image(str(tmp_path / "a.png"))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(rgb))
    gray = _save_image(str(tmp_path / "g.jpg"), seed=2, mode="L")
    out = decode_image(str(tmp_path / "g.jpg"))
    assert out.mode == "RGB" and out.size == gray.size
    arr = np.asarray(out)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


def test_corrupt_files_raise_with_path_and_reason(tmp_path):
    truncated, text, empty = _write_corrupt_files(str(tmp_path))
    # The truncated file's header is intact: PIL's verify() accepts it; only a full decode fails.
    with Image.open(truncated) as img:
        img.verify()
    for path, reason in ((truncated, "truncated"), (text, "cannot identify"), (empty, "empty")):
        with pytest.raises(CorruptImageError) as info:
            decode_image(path)
        assert info.value.path == path
        assert reason in info.value.reason.lower(), info.value.reason
        assert path in str(info.value)
    with pytest.raises(CorruptImageError, match="does not exist"):
        decode_image(str(tmp_path / "missing.jpg"))


# ------------------------------------------------------------------------------------------------
# folder layouts and file lists
# ------------------------------------------------------------------------------------------------


def _make_class_tree(root):
    _save_image(os.path.join(root, "zebra", "z1.jpg"), seed=1)
    _save_image(os.path.join(root, "zebra", "nested", "z2.PNG"), seed=2)
    _save_image(os.path.join(root, "apple", "a1.png"), seed=3)
    _save_image(os.path.join(root, "mango", "m1.bmp"), seed=4, fmt="BMP")
    with open(os.path.join(root, "apple", "README.txt"), "w") as fh:
        fh.write("not an image")


def test_image_folder_labels_from_sorted_class_names(tmp_path):
    _make_class_tree(str(tmp_path))
    ds = ImageFolderDataset(str(tmp_path))
    assert ds.classes == ["apple", "mango", "zebra"]
    assert len(ds) == 4 and ds.n_ignored_files == 1
    got = {os.path.relpath(ds.path(i), tmp_path): ds.labels[i] for i in range(len(ds))}
    assert got == {"apple/a1.png": 0, "mango/m1.bmp": 1, "zebra/nested/z2.PNG": 2, "zebra/z1.jpg": 2}
    img, label = ds.load(0)
    assert img.mode == "RGB" and label == 0


def test_image_folder_rejects_empty_class(tmp_path):
    _make_class_tree(str(tmp_path))
    os.makedirs(tmp_path / "empty_class")
    with pytest.raises(DatasetError, match="empty_class"):
        ImageFolderDataset(str(tmp_path))


def test_unlabeled_folder_is_recursive(tmp_path):
    _make_class_tree(str(tmp_path))
    _save_image(str(tmp_path / "top.webp"), seed=5, fmt="WEBP")
    ds = UnlabeledFolderDataset(str(tmp_path))
    assert len(ds) == 5 and set(ds.labels) == {-1}
    assert ds.load(len(ds) - 1)[1] == -1
    with pytest.raises(DatasetError, match="no image files"):
        UnlabeledFolderDataset(str(_empty_dir(tmp_path)))


def _empty_dir(tmp_path):
    d = tmp_path / "really_empty"
    d.mkdir()
    return d


def test_file_list_with_and_without_labels(tmp_path):
    _save_image(str(tmp_path / "imgs" / "a.jpg"), seed=1)
    _save_image(str(tmp_path / "imgs" / "b c.png"), seed=2)  # a space in the name, no label
    absolute = str(tmp_path / "abs.png")
    _save_image(absolute, seed=3)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nimgs/a.jpg 7\n\nimgs/b c.png\n{absolute} 2\n")
    ds = FileListDataset(str(lst))
    assert len(ds) == 3 and ds.labels == [7, -1, 2]
    assert ds.path(0) == str(tmp_path / "imgs" / "a.jpg") and ds.path(1) == str(tmp_path / "imgs" / "b c.png")
    assert ds.load(1)[0].mode == "RGB"
    bad = tmp_path / "bad.txt"
    bad.write_text("nowhere/x.jpg 1\n")
    with pytest.raises(DatasetError, match="does not exist"):
        FileListDataset(str(bad))


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------------


@needs_fmnist
def test_fashion_mnist_reads_real_files():
    train = FashionMNIST(split="train")
    test = FashionMNIST(split="test")
    assert len(train) == 60000 and len(test) == 10000
    for ds in (train, test):
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(ds), 28, 28)
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert np.all(np.bincount(ds.labels, minlength=10) == len(ds) // 10)  # balanced classes
    img, label = test.load(123)
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (28, 28) and label == test.labels[123]
    assert all(np.array_equal(arr[..., c], test.images[123]) for c in range(3))
    assert train.images.mean() > 50  # real pixels, not zeros: mean of Fashion-MNIST is ~73


def test_fashion_mnist_missing_names_install_command(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST(root=str(tmp_path))
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "dpkg -x" in msg
    assert "train-images-idx3-ubyte.gz" in msg


def _write_idx(path, magic, dims, payload):
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">" + "I" * (1 + len(dims)), magic, *dims) + payload)


def test_fashion_mnist_header_is_checked(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 2051, (3, 28, 28), images.tobytes())
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, (3,), bytes([4, 0, 9]))
    ds = FashionMNIST(root=str(tmp_path), split="test")
    assert np.array_equal(ds.images, images) and ds.labels.tolist() == [4, 0, 9]
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2051, (3,), bytes([4, 0, 9]))  # wrong magic
    with pytest.raises(FashionMNISTFormatError, match="magic"):
        FashionMNIST(root=str(tmp_path), split="test")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 2049, (4,), bytes([4, 0, 9]))  # short payload
    with pytest.raises(FashionMNISTFormatError, match="header says"):
        FashionMNIST(root=str(tmp_path), split="test")
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(root=str(tmp_path), split="val")


# ------------------------------------------------------------------------------------------------
# synthetic data and auto detection
# ------------------------------------------------------------------------------------------------


def test_synthetic_dataset_is_deterministic():
    a, b = SyntheticDataset(20, size=24, seed=3), SyntheticDataset(20, size=24, seed=3)
    img, label = a.load(13)
    assert img.size == (24, 24) and img.mode == "RGB" and label == 3
    assert np.array_equal(np.asarray(img), np.asarray(b.load(13)[0]))
    assert not np.array_equal(np.asarray(img), np.asarray(SyntheticDataset(20, size=24, seed=4).load(13)[0]))
    assert not np.array_equal(np.asarray(img), np.asarray(a.load(12)[0]))
    with pytest.raises(IndexError):
        a.load(20)


def _cfg(**kw):
    cfg = DataConfig()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_auto_detection_for_each_layout(tmp_path):
    tree = tmp_path / "tree"
    _make_class_tree(str(tree))
    assert detect_layout(str(tree)) == "imagefolder"
    assert isinstance(build_dataset(_cfg(path=str(tree))), ImageFolderDataset)

    flat = tmp_path / "flat"
    for i in range(3):
        _save_image(str(flat / f"{i}.jpg"), seed=i)
    _save_image(str(flat / "sub" / "x.jpg"), seed=9)  # images at the top: not a class tree
    assert detect_layout(str(flat)) == "folder"
    ds = build_dataset(_cfg(path=str(flat)))
    assert isinstance(ds, UnlabeledFolderDataset) and len(ds) == 4

    deep = tmp_path / "deep"
    _save_image(str(deep / "a" / "b" / "x.png"), seed=1)  # immediate sub-folder holds no image itself
    assert detect_layout(str(deep)) == "folder"

    lst = tmp_path / "files.txt"
    lst.write_text(f"{flat / '0.jpg'} 1\n")
    assert detect_layout(str(lst)) == "filelist"
    assert isinstance(build_dataset(_cfg(path=str(lst))), FileListDataset)

    assert detect_layout(None) == "fashion_mnist"
    fm = tmp_path / "fm"
    fm.mkdir()
    (fm / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert detect_layout(str(fm)) == "fashion_mnist"

    synthetic = build_dataset(_cfg(dataset="synthetic", synthetic_size=7))
    assert isinstance(synthetic, SyntheticDataset) and len(synthetic) == 7

    # An ImageNet-style root with train/ and val/: the split's sub-folder is used.
    root = tmp_path / "imagenet"
    _make_class_tree(str(root / "train"))
    _save_image(str(root / "val" / "n01" / "v.jpg"), seed=8)
    train, val = build_dataset(_cfg(path=str(root))), build_dataset(_cfg(path=str(root)), split="val")
    assert isinstance(train, ImageFolderDataset) and train.classes == ["apple", "mango", "zebra"]
    assert isinstance(val, ImageFolderDataset) and val.classes == ["n01"] and len(val) == 1

    # Explicit kinds override detection.
    assert isinstance(build_dataset(_cfg(path=str(tree), dataset="folder")), UnlabeledFolderDataset)


@needs_fmnist
def test_auto_without_path_is_fashion_mnist():
    ds = build_dataset(_cfg(path=None), split="test")
    assert isinstance(ds, FashionMNIST) and len(ds) == 10000


def test_bad_locations_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset(_cfg(path=str(tmp_path / "nope")))
    empty = _empty_dir(tmp_path)
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match="no image files"):
        build_dataset(_cfg(path=str(empty)))
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(DatasetError, match="not a .txt"):
        build_dataset(_cfg(path=str(other)))
    with pytest.raises(DatasetError, match="needs data.path"):
        build_dataset(_cfg(dataset="imagefolder"))

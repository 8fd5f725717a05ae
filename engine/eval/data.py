"""Which labeled train / evaluation sets an evaluation uses.

* ``--train-data`` and ``--val-data`` given: each is a Fashion-MNIST folder (its train resp. test
  split), a class-folder tree, or a labeled ``.txt`` file list.
* ``--data ROOT`` given: a Fashion-MNIST folder (train / test splits) or an ImageNet-style root
  holding ``train/`` and ``val/`` (or ``test/``) class-folder trees.
* Neither: the data the checkpoint was trained on, when it has a held-out split (Fashion-MNIST,
  the synthetic set, or a root with train/ and val/).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

from flashdino.pipelines.datasets import (
    FASHION_MNIST_FILE,
    DatasetError,
    FashionMNIST,
    FileListDataset,
    ImageFolderDataset,
    build_dataset,
)
from flashdino.pipelines.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT

EVAL_SPLITS = ("val", "test")


def _is_fashion_mnist(path: str) -> bool:
    return os.path.isfile(os.path.join(path, FASHION_MNIST_FILE)) or os.path.isfile(
        os.path.join(path, "t10k-images-idx3-ubyte.gz"))


def labeled_reader(path: str, split: str):
    """A labeled dataset at `path`; `split` ("train" or "test") picks the Fashion-MNIST split."""
    if os.path.isfile(path):
        if not path.lower().endswith(".txt"):
            raise DatasetError(f"'{path}' is a file but not a .txt file list")
        reader = FileListDataset(path)
    elif not os.path.isdir(path):
        raise DatasetError(f"evaluation data '{path}' does not exist")
    elif _is_fashion_mnist(path):
        reader = FashionMNIST(root=path, split=split)
    else:
        reader = ImageFolderDataset(path)
    if min(reader.labels) < 0:
        raise DatasetError(f"evaluation data '{path}' has unlabeled entries (label -1); k-NN and linear "
                           "evaluation need labels: a class-folder tree, a labeled file list or Fashion-MNIST")
    return reader


def _split_dirs(root: str) -> Optional[Tuple[str, str]]:
    train = os.path.join(root, "train")
    for name in EVAL_SPLITS:
        val = os.path.join(root, name)
        if os.path.isdir(train) and os.path.isdir(val):
            return train, val
    return None


def resolve_eval_data(cfg, data: Optional[str] = None, train_data: Optional[str] = None,
                      val_data: Optional[str] = None):
    """(train reader, eval reader, a one-line description) per the rules in this module's docstring."""
    if (train_data is None) != (val_data is None):
        raise DatasetError("give both --train-data and --val-data, or neither")
    if train_data is not None:
        return (labeled_reader(train_data, "train"), labeled_reader(val_data, "test"),
                f"train {train_data}, eval {val_data}")
    if data is not None:
        return _from_root(data)
    d = cfg.data
    kind = d.dataset
    if kind == "synthetic":
        return (build_dataset(d, "train", cfg.train.seed), build_dataset(d, "test", cfg.train.seed),
                "the synthetic set (train / test seeds)")
    if kind == "fashion_mnist" or (kind == "auto" and d.path is None):
        root = d.path or FASHION_MNIST_ROOT
        return FashionMNIST(root, "train"), FashionMNIST(root, "test"), f"Fashion-MNIST train / test ({root})"
    if d.path and os.path.isdir(d.path):
        if _is_fashion_mnist(d.path) or _split_dirs(d.path):
            return _from_root(d.path)
    raise DatasetError(
        f"the checkpoint was trained on data.path={d.path!r}, which has no held-out labeled split "
        "(train/ and val/ sub-folders); pass --train-data and --val-data (labeled class folders)"
    )


def _from_root(root: str):
    if not os.path.isdir(root):
        raise DatasetError(f"evaluation data '{root}' is not a directory")
    if _is_fashion_mnist(root):
        return FashionMNIST(root, "train"), FashionMNIST(root, "test"), f"Fashion-MNIST train / test ({root})"
    dirs = _split_dirs(root)
    if dirs is None:
        raise DatasetError(f"'{root}' has no train/ and val/ (or test/) sub-folders; pass --train-data and --val-data")
    return labeled_reader(dirs[0], "train"), labeled_reader(dirs[1], "test"), f"train {dirs[0]}, eval {dirs[1]}"

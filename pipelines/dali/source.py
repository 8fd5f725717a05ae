"""The DALI external source: which image each sample slot gets, its bytes and its crop parameters.

:class:`MultiCropSource` is called by DALI once per sample with a ``SampleInfo`` (epoch within the
pipeline's life, batch within the epoch, slot within the batch), possibly in worker processes
(``parallel=True``, spawn). From that alone it derives, with the same keys as the torchvision loader:

* the image index: this rank's share of the (seed, epoch) permutation, cut into batches
  (``sharding.rank_indices``, as ``ResumableSampler``; a resumed epoch starts at ``start_batch``);
* the parameters: an RNG from (seed, epoch, index) (``sharding.sample_rng``, as the torchvision loader);
* corrupt files: inspected before DALI sees them (see :mod:`.validate`); a broken one is replaced by
  the next index (wrapping, also checked) and its index reported in the ``skipped`` output.

Outputs per sample: ``data`` (encoded bytes, or HWC uint8 pixels for in-memory datasets), ``meta``
int64 (label, index used), the :class:`~.params.PackedParams` arrays, ``skipped`` int64 (n,).
Kept free of torch so that spawned workers start fast and stay small.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from ..datasets import CorruptImageError
from ..sharding import rank_indices, sample_rng, samples_per_rank
from .params import PackedParams, ViewSpec, sample_fast
from .validate import read_and_inspect

OUTPUT_NAMES = ("data", "meta", "windows", "color", "order", "flags", "sigma", "skipped")


class MultiCropSource:
    """Per-sample callback for ``fn.external_source(batch=False)``; picklable for spawned workers.

    dataset: a reader with ``files``/``labels`` (encoded images read from disk) or any reader with
    ``load(i) -> (PIL image, label)`` / ``images`` arrays (pixels handed over directly).
    """

    def __init__(
        self,
        dataset,
        spec: ViewSpec,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pad_ranks: bool = False,
        first_epoch: int = 0,
        start_batch: int = 0,
        params: str = "fast",
        augmentation=None,
        blocklist: Tuple[int, ...] = (),
    ):
        if params not in ("fast", "reference"):
            raise ValueError(f"MultiCropSource: params must be 'fast' or 'reference', got {params!r}")
        if params == "reference" and augmentation is None:
            raise ValueError("MultiCropSource: params='reference' needs the MultiCropAugmentation")
        self.dataset = dataset
        self.spec = spec
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size, self.pad_ranks = int(rank), int(world_size), bool(pad_ranks)
        self.first_epoch, self.start_batch = int(first_epoch), int(start_batch)
        self.params = params
        self.augmentation = augmentation
        self.n = len(dataset)
        self.encoded = hasattr(dataset, "files")
        self.blocklist = frozenset(int(i) for i in blocklist)
        self.batches_per_epoch = samples_per_rank(self.n, self.world_size, self.pad_ranks) // self.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"MultiCropSource: {self.n} images give no full batch of {self.batch_size} per rank on "
                f"{self.world_size} rank(s); lower data.batch_size or use more data"
            )
        if not 0 <= self.start_batch <= self.batches_per_epoch:
            raise ValueError(f"MultiCropSource: start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self._order: Optional[Tuple[int, np.ndarray]] = None
        self._corrupt: Dict[int, str] = {}  # per process: files found broken, not re-read

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_order"] = None
        return state

    # -- which image ---------------------------------------------------------------------------
    def epoch_of(self, epoch_idx: int) -> int:
        return self.first_epoch + epoch_idx

    def batch_of(self, epoch_idx: int, iteration: int) -> int:
        return iteration + (self.start_batch if epoch_idx == 0 else 0)

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, rank_indices(self.n, self.seed, epoch, self.rank, self.world_size, self.pad_ranks))
        return self._order[1]

    def batch_indices(self, epoch: int, batch: int) -> List[int]:
        idx = self.order(epoch)
        return idx[batch * self.batch_size : (batch + 1) * self.batch_size].tolist()

    # -- loading ---------------------------------------------------------------------------------
    def path(self, index: int) -> str:
        if hasattr(self.dataset, "path"):
            return self.dataset.path(index)
        return f"{type(self.dataset).__name__}[{index}]"

    def _load_one(self, index: int) -> Tuple[np.ndarray, int, int, int]:
        """(data, width, height, label) of image `index`; CorruptImageError when unusable."""
        if index in self.blocklist:
            raise CorruptImageError(self.path(index), "failed to decode in DALI (found by the loader)")
        if self.encoded:
            data, w, h = read_and_inspect(self.dataset.files[index])
            return data, w, h, int(self.dataset.labels[index])
        images = getattr(self.dataset, "images", None)
        if images is not None:  # Fashion-MNIST style (N, H, W) or (N, H, W, 3) uint8 arrays
            img, label = np.asarray(images[index]), int(self.dataset.labels[index])
        else:
            pil, label = self.dataset.load(index)
            img = np.asarray(pil.convert("RGB"))
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        return np.ascontiguousarray(img, dtype=np.uint8), img.shape[1], img.shape[0], int(label)

    def resolve(self, index: int) -> Tuple[np.ndarray, int, int, int, int, List[int]]:
        """(data, width, height, label, index used, indices skipped): the next usable image from `index`."""
        skipped: List[int] = []
        for step in range(self.n):
            j = (index + step) % self.n
            if j in self._corrupt:
                skipped.append(j)
                continue
            try:
                data, w, h, label = self._load_one(j)
                return data, w, h, label, j, skipped
            except CorruptImageError as exc:
                self._corrupt[j] = exc.reason
                skipped.append(j)
        raise RuntimeError(f"MultiCropSource: none of the {self.n} images could be used (first: {self.path(index)})")

    def sample(self, index: int, epoch: int) -> Tuple[np.ndarray, ...]:
        data, w, h, label, used, skipped = self.resolve(index)
        # Parameters come from the requested index's RNG (as in the torchvision loader), so a
        # replacement is deterministic too.
        rng = sample_rng(self.seed, epoch, index)
        if self.params == "fast":
            p = sample_fast(self.spec, w, h, rng)
        else:
            from .params import sample_reference

            p = sample_reference(self.augmentation, self.spec, w, h, rng)
        meta = np.array([label, used], dtype=np.int64)
        return (data, meta) + tuple(p) + (np.array(skipped, dtype=np.int64),)

    def __call__(self, info) -> Tuple[np.ndarray, ...]:
        batch = self.batch_of(info.epoch_idx, info.iteration)
        if batch >= self.batches_per_epoch:
            raise StopIteration
        epoch = self.epoch_of(info.epoch_idx)
        index = int(self.order(epoch)[batch * self.batch_size + info.idx_in_batch])
        return self.sample(index, epoch)

    def reasons(self) -> Dict[int, str]:
        """Why each image found broken in this process was skipped."""
        return dict(self._corrupt)


def packed_from_outputs(outputs) -> PackedParams:
    """Rebuild PackedParams from one sample's source outputs (tests)."""
    return PackedParams(*outputs[2:7])


def n_batches(n: int, batch_size: int, world_size: int) -> int:
    return (n // world_size) // batch_size

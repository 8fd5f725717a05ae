"""Deterministic, resumable multi-crop loading with torch's DataLoader.

Determinism comes from keys, not from process state:
* a sample's crops come from an RNG seeded by (seed, epoch, index) -> independent of worker count
  and of the order samples are fetched in;
* the sampler's order comes from (seed, epoch) and can start at any batch of an epoch;
* a batch's masks come from (seed, epoch, rank, batch index).
So resuming at batch k of epoch e reproduces batches k.. of the uninterrupted run exactly.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .augment import MultiCropAugmentation
from .datasets import CorruptImageError, build_dataset
from .masking import BatchMasking, mask_indices_and_weights
from .sharding import mask_rng, rank_indices, sample_rng, samples_per_rank
from .worker_signals import ignore_stop_signals


Key = Union[int, Tuple[int, int, int]]  # index, or (index, epoch, batch index) from the loader's sampler


class MultiCropDataset(torch.utils.data.Dataset):
    """Wraps a reader (``load``/``path``/``__len__``) and a :class:`MultiCropAugmentation`.

    ``dataset[i]`` (or ``dataset[(i, epoch, batch_index)]`` as the loader's sampler asks) returns a dict:
    ``global_crops`` (list of 2 tensors), ``local_crops`` (list), ``label``, ``index`` (the image actually
    used), ``requested_index``, ``skipped`` (paths of corrupt files replaced), ``epoch``, ``batch_index``
    and, with `mask_fn`, ``masks``.

    A corrupt file is replaced by the next index (wrapping), which is checked too; the crops still come
    from the requested index's RNG, so the replacement is deterministic as well.

    `mask_fn(rng) -> (2, P) bool array`, when given, draws masks per sample (in the workers) instead of
    per batch in the collate function; it gets the sample's RNG after the crops are drawn.
    """

    def __init__(
        self,
        dataset,
        augmentation: MultiCropAugmentation,
        seed: int,
        mask_fn: Optional[Callable[[np.random.Generator], np.ndarray]] = None,
    ):
        if len(dataset) == 0:
            raise ValueError("MultiCropDataset: the dataset is empty")
        if seed < 0:
            raise ValueError(f"MultiCropDataset: seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.augmentation = augmentation
        self.seed = int(seed)
        self.mask_fn = mask_fn
        self.epoch = 0
        self._known_corrupt: Dict[int, str] = {}  # per process: skip re-decoding files already found broken

    @property
    def reader(self):
        """The wrapped dataset reader (load/path/len): what single-image consumers (plots) read."""
        return self.dataset

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _load_with_replacement(self, index: int):
        n = len(self.dataset)
        skipped: List[str] = []
        for step in range(n):
            j = (index + step) % n
            if j in self._known_corrupt:
                skipped.append(self._known_corrupt[j])
                continue
            try:
                img, label = self.dataset.load(j)
                return img, label, j, skipped
            except CorruptImageError as exc:
                self._known_corrupt[j] = exc.path
                skipped.append(exc.path)
        raise RuntimeError(f"MultiCropDataset: all {n} files of the dataset failed to decode (first: {skipped[0]})")

    def __getitem__(self, key: Key) -> Dict[str, Any]:
        if isinstance(key, tuple):
            index, epoch, batch_index = (int(k) for k in key)
        else:
            index, epoch, batch_index = int(key), self.epoch, None
        if not 0 <= index < len(self.dataset):
            raise IndexError(f"MultiCropDataset: index {index} out of range [0, {len(self.dataset)})")
        img, label, used, skipped = self._load_with_replacement(index)
        rng = sample_rng(self.seed, epoch, index)
        crops = self.augmentation(img, rng)
        sample = {
            "global_crops": crops[:2],
            "local_crops": crops[2:],
            "label": int(label),
            "index": used,
            "requested_index": index,
            "skipped": skipped,
            "epoch": epoch,
            "batch_index": batch_index,
        }
        if self.mask_fn is not None:
            sample["masks"] = torch.as_tensor(np.asarray(self.mask_fn(rng), dtype=bool))
        return sample


class ResumableSampler(torch.utils.data.Sampler):
    """Batch sampler: a (seed, epoch) permutation, sharded by rank, cut into batches; can start mid-epoch.

    Sharding follows DistributedSampler (``sharding.rank_indices``): the permutation is truncated to
    a multiple of `world_size`, or padded by wrapping (`pad_ranks`, the v1 tree's sampler; always
    without drop_last), and rank r takes every world_size-th index starting at r. Each rank's stream
    is cut into batches of `batch_size`; with drop_last the final partial batch is dropped, so every
    batch has the same size (static shapes for compiled steps).

    ``set_start_batch(k)`` makes the next pass over the current epoch start at batch k (resume); it is
    used once, and ``set_epoch`` to another epoch discards it.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 pad_ranks: bool = False):
        if n < 1:
            raise ValueError(f"ResumableSampler: n must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"ResumableSampler: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.pad_ranks = bool(pad_ranks) or not self.drop_last  # without drop_last every sample is seen
        self.epoch = 0
        self._start: Optional[Tuple[int, int]] = None  # (epoch, batch) of a pending resume
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"ResumableSampler: {n} samples give no full batch of {batch_size} per rank on {world_size} rank(s) "
                "with drop_last; lower data.batch_size or use more data"
            )

    @property
    def samples_per_rank(self) -> int:
        return samples_per_rank(self.n, self.world_size, self.pad_ranks)

    @property
    def batches_per_epoch(self) -> int:
        per_rank = self.samples_per_rank
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    @property
    def start_batch(self) -> int:
        return self._start[1] if self._start is not None and self._start[0] == self.epoch else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start_batch(self, k: int) -> None:
        if not 0 <= k <= self.batches_per_epoch:
            raise ValueError(f"ResumableSampler: start batch {k} outside [0, {self.batches_per_epoch}]")
        self._start = (self.epoch, int(k))

    def rank_indices(self, epoch: Optional[int] = None) -> np.ndarray:
        """This rank's sample order for `epoch` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        return rank_indices(self.n, self.seed, epoch, self.rank, self.world_size, self.pad_ranks)

    def batches(self, epoch: Optional[int] = None, start: int = 0) -> Iterator[List[int]]:
        idx = self.rank_indices(epoch)
        for b in range(start, self.batches_per_epoch):
            yield idx[b * self.batch_size : (b + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[List[int]]:
        start = self.start_batch
        self._start = None  # one-shot: the next pass (next epoch or a re-run) starts at 0
        return self.batches(self.epoch, start)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class KeyedBatchSampler(torch.utils.data.Sampler):
    """Yields [(index, epoch, batch index), ...] so samples carry the keys their RNGs derive from.

    Passing the epoch with every index (instead of relying on the dataset's set_epoch) keeps worker
    processes from ever using a stale epoch.
    """

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        start = self.sampler.start_batch
        for b, batch in enumerate(iter(self.sampler), start=start):
            yield [(i, epoch, b) for i in batch]

    def __len__(self) -> int:
        return len(self.sampler)


def collate_multicrop(
    samples: Sequence[Dict[str, Any]],
    masking: Optional[Callable[[int, Any], torch.Tensor]] = None,
    seed: Optional[int] = None,
    epoch: Optional[int] = None,
    batch_index: Optional[int] = None,
    rank: int = 0,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Stack samples crop-major and draw the batch's masks.

    `masking(n_global_crops, rng) -> (2B, P) bool` (e.g. :class:`BatchMasking`) is called with an RNG
    from (seed, epoch, rank, batch index); epoch and batch index default to the samples' own keys.
    Samples that already carry ``masks`` (a per-sample mask_fn) are stacked instead.
    """
    if not samples:
        raise ValueError("collate_multicrop: empty batch")
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][v] for v in range(n_global) for s in samples])
    local_crops = torch.stack([s["local_crops"][v] for v in range(n_local) for s in samples]) if n_local else None
    if dtype is not None:
        global_crops = global_crops.to(dtype)
        local_crops = local_crops.to(dtype) if local_crops is not None else None
    skipped = [p for s in samples for p in s["skipped"]]
    batch = {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "masks": None,
        "mask_indices": None,
        "mask_weights": None,
        "n_skipped": len(skipped),
        "skipped": skipped,
    }
    masks = None
    if "masks" in samples[0]:
        # Per-sample masks, (n_global, P) each -> crop-major (n_global * B, P).
        masks = torch.stack([s["masks"][v].reshape(-1) for v in range(n_global) for s in samples])
    elif masking is not None:
        epoch = samples[0]["epoch"] if epoch is None else epoch
        batch_index = samples[0]["batch_index"] if batch_index is None else batch_index
        if seed is None or epoch is None or batch_index is None:
            raise ValueError(
                "collate_multicrop: masks need seed, epoch and batch_index (pass them, or use samples from the "
                f"loader's KeyedBatchSampler); got seed={seed}, epoch={epoch}, batch_index={batch_index}"
            )
        masks = masking(n_global * len(samples), mask_rng(seed, epoch, batch_index, rank))
    if masks is not None:
        batch["masks"] = masks
        batch["mask_indices"], batch["mask_weights"] = mask_indices_and_weights(masks)
    return batch


def build_masking(cfg) -> Optional[BatchMasking]:
    """Per-batch iBOT masking for SimDINOv2 / DINOv2 (grid = global_size // patch_size); None otherwise."""
    return BatchMasking.from_config(cfg)


def build_train_sampler(cfg, n: int, rank: int = 0, world_size: int = 1) -> ResumableSampler:
    """The training sampler of both pipelines. The v1 tree's DistributedSampler pads each rank's share
    where the v2 tree drops the remainder, so their epochs differ by an iteration when N does not
    divide n (spec 1.4's n); the schedule style picks which."""
    return ResumableSampler(n, cfg.data.batch_size, cfg.train.seed, rank=rank, world_size=world_size,
                            drop_last=True, pad_ranks=cfg.optim.schedule_style == "v1")


def build_train_loader(cfg, rank: int = 0, world_size: int = 1, epoch: int = 0, start_batch: int = 0):
    """(DataLoader, ResumableSampler, MultiCropDataset) for `cfg` (a ``flashdino.engine.config.Config``).

    Call ``sampler.set_epoch(e)`` before each epoch; ``start_batch`` resumes inside `epoch`.
    """
    seed = cfg.train.seed
    reader = build_dataset(cfg.data, split="train", seed=seed)
    dataset = MultiCropDataset(reader, MultiCropAugmentation.from_config(cfg.crops), seed=seed)
    sampler = build_train_sampler(cfg, len(reader), rank, world_size)
    dataset.set_epoch(epoch)
    sampler.set_epoch(epoch)
    if start_batch:
        sampler.set_start_batch(start_batch)
    collate = functools.partial(collate_multicrop, masking=build_masking(cfg), seed=seed, rank=rank)
    loader = torch.utils.data.DataLoader(
        dataset,
        # An own generator: without it every new iterator draws its worker base seed from the global
        # torch RNG, and a resumed run (which creates one iterator more) would drift from a straight one.
        generator=torch.Generator().manual_seed(seed),
        batch_sampler=KeyedBatchSampler(sampler),
        num_workers=cfg.data.num_workers,
        collate_fn=collate,
        worker_init_fn=ignore_stop_signals,  # a Ctrl-C stops the trainer, which then stops its workers
        pin_memory=torch.cuda.is_available(),
        # Workers live across epochs (not re-forked 30 times in a 30-epoch run): every sample's key
        # carries its epoch (KeyedBatchSampler), so a worker's copy of the dataset is never stale.
        persistent_workers=cfg.data.num_workers > 0,
    )
    return loader, sampler, dataset

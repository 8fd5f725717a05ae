"""The DALI multi-crop loader: same batches as the torchvision loader's, produced by DALI.

``build_dali_loader(cfg, rank, world_size, epoch, start_batch, device_id)`` mirrors
``flashdino.pipelines.loader.build_train_loader`` and returns ``(loader, sampler, reader)``: the
trainer drives epochs with ``sampler.set_epoch(e)`` (and ``set_start_batch(k)`` to resume) exactly as
with the torchvision loader, and iterates the loader for one epoch of batch dicts:

    global_crops (2B, 3, G, G) crop-major, local_crops (L*B, 3, l, l) or None,
    labels (B,), indices (B,) images used, masks (2B, P) bool or None, mask_indices (M,),
    mask_weights (M,), n_skipped int, skipped [paths]

On a GPU (``device_id`` set) crops are decoded and augmented on that GPU and land in the training
dtype on the current torch stream with no host synchronization; labels and masks follow with
non-blocking copies. With ``device_id=None`` everything runs on the CPU (tests, DALI-CPU benchmark).

Keys match the torchvision loader: the sample order comes from (seed, epoch) sharded by rank, a
sample's parameters from (seed, epoch, index), a batch's masks from (seed, epoch, rank, batch index).
With ``params="reference"`` the crop parameters are the torchvision loader's, draw for draw.

Corrupt files never reach the decoder (see :mod:`.validate`): they are replaced by the next image
and reported in ``skipped``. If one still makes DALI fail, the loader finds it with a one-image
decode test, adds it to a block list and rebuilds the pipeline at the failed batch.
"""
from __future__ import annotations

import collections
import logging
import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Set

import numpy as np
import torch

from ..augment import MultiCropAugmentation
from ..datasets import CorruptImageError, build_dataset
from ..fast_masking import FastBatchMasking
from ..loader import ResumableSampler, build_train_sampler
from ..sharding import mask_rng
from ..masking import mask_indices_and_weights
from . import plugin as plugin_mod
from .graph import build_pipeline
from .params import ViewSpec
from .source import MultiCropSource

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_OUT_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
MAX_RECOVERIES_PER_BATCH = 4


class DaliPipelineError(RuntimeError):
    """The DALI pipeline failed and no single input file could be blamed."""


class DaliMultiCropLoader:
    """Iterable over one epoch of multi-crop batches (see the module docstring).

    reader: a dataset from ``flashdino.pipelines.datasets`` (files, Fashion-MNIST, synthetic).
    sampler: the ``ResumableSampler`` whose epoch / start batch each ``iter()`` follows.
    masking: ``masking(n_global_crops, rng) -> (2B, P)`` bool (e.g. ``FastBatchMasking``) or None.
    use_plugin: None = use the native operator when it loads (else warn once and fall back).
    """

    def __init__(
        self,
        reader,
        augmentation: MultiCropAugmentation,
        sampler: ResumableSampler,
        *,
        seed: int,
        device_id: Optional[int] = None,
        masking=None,
        dtype: torch.dtype = torch.float32,
        num_threads: Optional[int] = None,
        py_workers: int = 0,
        prefetch: int = 2,
        params: str = "fast",
        use_plugin: Optional[bool] = None,
        hw_decoder_load: float = 0.9,
    ):
        if params not in ("fast", "reference"):
            raise ValueError(f"DaliMultiCropLoader: params must be 'fast' or 'reference', got {params!r}")
        if dtype not in _OUT_DTYPE_NAMES:
            raise ValueError(f"DaliMultiCropLoader: dtype must be float32, float16 or bfloat16, got {dtype}")
        if len(reader) != sampler.n:
            raise ValueError(f"DaliMultiCropLoader: sampler is for {sampler.n} images, the reader has {len(reader)}")
        if device_id is not None and not torch.cuda.is_available():
            raise RuntimeError(f"DaliMultiCropLoader: device_id={device_id} but CUDA is not available; pass device_id=None")
        self.reader = reader
        self.augmentation = augmentation
        self.spec = ViewSpec.from_augmentation(augmentation)
        self.sampler = sampler
        self.seed = int(seed)
        self.device_id = device_id
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self.masking = masking
        self.dtype = dtype
        self.num_threads = num_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self.py_workers = int(py_workers)
        self.prefetch = int(prefetch)
        self.params = params
        self.hw_decoder_load = hw_decoder_load
        self.use_plugin = self._resolve_plugin(use_plugin)
        self.blocklist: Set[int] = set()
        self.total_skipped = 0
        self.skipped_seen: Set[str] = set()
        self._pipe = None
        self._pipe_state = None  # (first_epoch, start_batch, epoch_idx, next_batch)
        self._pending = collections.deque()  # (event, DALI views) kept alive until their copies ran

    # -- set-up ------------------------------------------------------------------------------------
    def _resolve_plugin(self, use_plugin: Optional[bool]) -> bool:
        device = "gpu" if self.device_id is not None else "cpu"
        if use_plugin is False:
            return False
        loaded = plugin_mod.load_plugin(warn=use_plugin is None)
        if loaded and plugin_mod.has_backend(device):
            return True
        if use_plugin:
            reason = plugin_mod.unavailable_reason() or f"the plugin at {loaded} has no {device} kernel"
            raise RuntimeError(f"DaliMultiCropLoader: use_plugin=True but the native operator is unavailable: {reason}")
        if loaded:
            log.warning("flashdino DALI pipeline: plugin %s has no %s kernel; %s", loaded, device, plugin_mod.FALLBACK_NOTE)
        return False

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def __len__(self) -> int:
        return self.sampler.batches_per_epoch - self.sampler.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next ``iter()`` runs `epoch` from batch `start_batch` (what the trainer calls per epoch)."""
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(start_batch)

    def _make_source(self, epoch: int, start: int) -> MultiCropSource:
        return MultiCropSource(
            self.reader, self.spec, self.batch_size, self.seed,
            rank=self.sampler.rank, world_size=self.sampler.world_size, pad_ranks=self.sampler.pad_ranks,
            first_epoch=epoch, start_batch=start, params=self.params,
            augmentation=self.augmentation if self.params == "reference" else None,
            blocklist=tuple(sorted(self.blocklist)),
        )  # fmt: skip

    def _start_pipeline(self, epoch: int, start: int) -> None:
        self.close()
        source = self._make_source(epoch, start)
        pipe, _ = build_pipeline(
            source,
            device_id=self.device_id,
            num_threads=self.num_threads,
            py_workers=self.py_workers,
            prefetch=self.prefetch,
            out_dtype=_OUT_DTYPE_NAMES[self.dtype],
            mean=self.augmentation.mean,
            std=self.augmentation.std,
            use_plugin=self.use_plugin,
            hw_decoder_load=self.hw_decoder_load,
        )
        with warnings.catch_warnings():
            # The built-in chain has no use for the jitter order; DALI would warn about it.
            warnings.filterwarnings("ignore", message=r".*produces \d+ outputs, but the output at the index")
            pipe.build()
        self._pipe, self._source = pipe, source
        self._pipe_state = [epoch, start, 0, start]

    def close(self) -> None:
        """Release the pipeline (and its worker processes)."""
        for event, _ in self._pending:  # copies still queued read DALI's buffers: let them finish
            event.synchronize()
        self._pending.clear()
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            del pipe

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch, start = self.sampler.epoch, self.sampler.start_batch
        batch_lists = iter(self.sampler)  # consumes a pending resume exactly like the DataLoader path
        del batch_lists
        n_batches = self.sampler.batches_per_epoch
        state = self._pipe_state
        # Reuse the running pipeline when it is exactly where this epoch starts.
        if not (self._pipe is not None and state[0] + state[2] == epoch and state[3] == start):
            self._start_pipeline(epoch, start)
        for b in range(start, n_batches):
            outputs = self._run_batch(epoch, b)
            self._pipe_state[3] = b + 1  # before the yield: the consumer may stop here
            yield self._to_batch(outputs, epoch, b)
        self._end_epoch()

    def _output_stream(self):
        # On the GPU, outputs come back ordered on torch's current stream instead of host-synchronous
        # (DALI's run() without a stream waits for each batch on the host).
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _end_epoch(self) -> None:
        try:
            self._pipe.run(self._output_stream())
        except StopIteration:
            self._pipe.reset()
            self._pipe_state[2] += 1
            self._pipe_state[3] = 0
            return
        raise DaliPipelineError("DALI pipeline produced more batches than the sampler's epoch holds")

    def _run_batch(self, epoch: int, b: int):
        for attempt in range(MAX_RECOVERIES_PER_BATCH + 1):
            try:
                return self._pipe.run(self._output_stream())
            except StopIteration:
                raise DaliPipelineError(f"DALI pipeline ended early at epoch {epoch} batch {b}") from None
            except RuntimeError as exc:
                if attempt == MAX_RECOVERIES_PER_BATCH:
                    raise
                culprits = self._find_undecodable(epoch, b)
                if not culprits:
                    raise DaliPipelineError(
                        f"DALI pipeline failed at epoch {epoch} batch {b} and no single image of batches "
                        f"{b}..{b + self.prefetch} fails to decode on its own: {str(exc).splitlines()[-1]}"
                    ) from exc
                for j in culprits:
                    log.warning("flashdino DALI loader: %s fails in DALI's decoder; skipping it from now on",
                                self._source.path(j))
                self.blocklist.update(culprits)
                self._start_pipeline(epoch, b)  # same batch, rebuilt without the culprits
        raise AssertionError("unreachable")

    def _find_undecodable(self, epoch: int, b: int) -> List[int]:
        """Images of batches b.. (the ones DALI may have been working on) that DALI cannot decode."""
        if not self._source.encoded:
            return []
        source = self._make_source(epoch, 0)
        last = min(b + self.prefetch + 1, source.batches_per_epoch)
        used: Dict[int, np.ndarray] = {}
        for batch in range(b, last):
            for index in source.batch_indices(epoch, batch):
                try:
                    data, _, _, _, j, _ = source.resolve(index)
                except RuntimeError:
                    continue
                used[j] = data
        keys = sorted(used)
        bad = find_undecodable([used[k] for k in keys], self.device_id)
        return [keys[i] for i in bad]

    def _copy_views(self, outs, first: int, count: int, batch: int) -> Optional[torch.Tensor]:
        if count == 0:
            return None
        tensors = [outs[first + v].as_tensor() for v in range(count)]
        shape = tuple(tensors[0].shape())
        dst = torch.empty((count * batch,) + shape[1:], dtype=self.dtype, device=self.device)
        raw_dst = dst.view(torch.uint16) if self.use_plugin and self.dtype == torch.bfloat16 else dst
        views = []
        for v, t in enumerate(tensors):
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    src = torch.from_dlpack(t)  # the current stream waits for DALI's work
            else:
                src = torch.from_numpy(np.asarray(t))
            if src.dtype != raw_dst.dtype:
                src = src.to(raw_dst.dtype)  # built-in chain: float32 -> bfloat16
            raw_dst[v * batch : (v + 1) * batch].copy_(src, non_blocking=True)
            views.append(src)
        if self.device.type == "cuda":
            # DALI's buffers must outlive the copies queued on the torch stream: keep them until an
            # event after the copies has passed (checked without blocking).
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._pending.append((event, views))
        return dst

    def _release_finished(self) -> None:
        while self._pending and self._pending[0][0].query():
            self._pending.popleft()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _to_batch(self, outs, epoch: int, b: int) -> Dict[str, Any]:
        self._release_finished()
        B, L = self.batch_size, self.spec.n_local
        global_crops = self._copy_views(outs, 0, 2, B)
        local_crops = self._copy_views(outs, 2, L, B)
        meta = np.asarray(outs[2 + L].as_tensor())
        skipped_idx = [int(i) for s in range(B) for i in np.asarray(outs[3 + L][s]).reshape(-1)]
        skipped = [self._source.path(i) for i in skipped_idx]
        self._report_skipped(skipped)
        batch: Dict[str, Any] = {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "labels": self._to_device(torch.from_numpy(meta[:, 0].copy())),
            "indices": torch.from_numpy(meta[:, 1].copy()),
            "masks": None,
            "mask_indices": None,
            "mask_weights": None,
            "n_skipped": len(skipped),
            "skipped": skipped,
        }
        if self.masking is not None:
            masks = self.masking(2 * B, mask_rng(self.seed, epoch, b, self.sampler.rank))
            indices, weights = mask_indices_and_weights(masks)
            batch["masks"] = self._to_device(masks)
            batch["mask_indices"] = self._to_device(indices)
            batch["mask_weights"] = self._to_device(weights)
        return batch

    def _report_skipped(self, paths: List[str]) -> None:
        self.total_skipped += len(paths)
        for p in paths:
            if p not in self.skipped_seen:
                self.skipped_seen.add(p)
                reason = _reason(p)
                log.warning("flashdino DALI loader: skipped unusable image %s (%s); %d distinct so far",
                            p, reason, len(self.skipped_seen))


def _reason(path: str) -> str:
    from .validate import read_and_inspect

    try:
        read_and_inspect(path)
    except CorruptImageError as exc:
        return exc.reason
    return "fails in DALI's decoder"


def decodes_in_dali(images: List[np.ndarray], device_id: Optional[int]) -> bool:
    """Whether DALI's image decoder (on GPU `device_id`, or the CPU) accepts all these encoded images."""
    from nvidia.dali import Pipeline
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    pipe = Pipeline(batch_size=len(images), num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    with pipe:
        x = fn.external_source(source=lambda: list(images), batch=True)
        pipe.set_outputs(fn.decoders.image(x, device="mixed" if device_id is not None else "cpu",
                                           output_type=types.RGB, adjust_orientation=False))  # fmt: skip
    try:
        pipe.build()
        pipe.run()
        return True
    except RuntimeError:
        return False
    finally:
        del pipe


def find_undecodable(images: List[np.ndarray], device_id: Optional[int]) -> List[int]:
    """Positions of the images DALI cannot decode, by bisection (a failed pipeline is discarded)."""
    if not images or decodes_in_dali(images, device_id):
        return []
    if len(images) == 1:
        return [0]
    half = len(images) // 2
    left = find_undecodable(images[:half], device_id)
    return left + [half + i for i in find_undecodable(images[half:], device_id)]


def build_dali_loader(cfg, rank: int = 0, world_size: int = 1, epoch: int = 0, start_batch: int = 0,
                      device_id: Optional[int] = None, params: str = "fast", use_plugin: Optional[bool] = None):  # fmt: skip
    """(DaliMultiCropLoader, ResumableSampler, reader) for `cfg`, mirroring ``build_train_loader``.

    Call ``sampler.set_epoch(e)`` before each epoch (``set_start_batch(k)`` resumes inside one).
    device_id: the GPU to decode and augment on; None runs the whole pipeline on the CPU.
    Crops come out in ``cfg.train.precision``'s dtype; ``cfg.data.num_workers`` worker processes
    read files and draw parameters (0: in the main process).
    """
    seed = cfg.train.seed
    reader = build_dataset(cfg.data, split="train", seed=seed)
    augmentation = MultiCropAugmentation.from_config(cfg.crops)
    sampler = build_train_sampler(cfg, len(reader), rank, world_size)
    sampler.set_epoch(epoch)
    if start_batch:
        sampler.set_start_batch(start_batch)
    loader = DaliMultiCropLoader(
        reader, augmentation, sampler,
        seed=seed, device_id=device_id, masking=FastBatchMasking.from_config(cfg),
        dtype=PRECISION_DTYPES[cfg.train.precision], py_workers=cfg.data.num_workers,
        params=params, use_plugin=use_plugin,
    )  # fmt: skip
    return loader, sampler, reader

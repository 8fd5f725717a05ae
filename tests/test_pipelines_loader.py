"""Deterministic, resumable multi-crop loading: worker-count independence, exact resume, corrupt files, collate."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flashdino.engine.config import build_config
from flashdino.pipelines.augment import MultiCropAugmentation
from flashdino.pipelines.datasets import SyntheticDataset, UnlabeledFolderDataset
from flashdino.pipelines.loader import (
    KeyedBatchSampler,
    MultiCropDataset,
    ResumableSampler,
    build_train_loader,
    collate_multicrop,
    mask_rng,
)
from flashdino.pipelines.masking import BatchMasking, mask_indices_and_weights

SMALL_AUG = dict(global_size=24, local_size=12, n_local=2)


def _loader(dataset, sampler, workers, masking=None, seed=0):
    import functools

    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=KeyedBatchSampler(sampler),
        num_workers=workers,
        collate_fn=functools.partial(collate_multicrop, masking=masking, seed=seed),
    )


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


# ------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------


def test_sampler_permutation_sharding_and_lengths():
    s = ResumableSampler(23, batch_size=4, seed=1)
    assert s.batches_per_epoch == 5 and len(s) == 5
    e0 = [i for batch in s for i in batch]
    assert len(e0) == 20 and len(set(e0)) == 20 and set(e0) <= set(range(23))
    s.set_epoch(1)
    assert [i for batch in s for i in batch] != e0  # a new order every epoch
    s.set_epoch(0)
    assert [i for batch in s for i in batch] == e0  # ... and the same order for the same epoch

    # Two ranks: disjoint shards, equal batch counts.
    r0, r1 = (ResumableSampler(23, 4, seed=1, rank=r, world_size=2) for r in (0, 1))
    a, b = [i for x in r0 for i in x], [i for x in r1 for i in x]
    assert r0.batches_per_epoch == r1.batches_per_epoch == 2 and not set(a) & set(b)

    # Without drop_last every sample appears (the last batch may be short).
    full = ResumableSampler(23, 4, seed=1, drop_last=False)
    batches = list(full)
    assert full.batches_per_epoch == 6 and [len(x) for x in batches] == [4, 4, 4, 4, 4, 3]
    assert sorted(i for x in batches for i in x) == list(range(23))
    with pytest.raises(ValueError, match="no full batch"):
        ResumableSampler(3, 4, seed=0)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, 2, seed=0, rank=2, world_size=2)


@pytest.mark.parametrize("n, world_size, batch", [(1000, 3, 2), (1_281_167, 3, 16), (1_281_167, 8, 64), (23, 4, 2), (5, 7, 1)])
def test_sampler_padded_shares_give_the_v1_epoch_length(n, world_size, batch):
    """Spec 1.4: n (v1) = floor(ceil(n/N)/B), n (v2) = floor(n/(N*B)); padding repeats the
    permutation's first images (cyclically when the ranks outnumber the images), as DistributedSampler."""
    padded = [ResumableSampler(n, batch, seed=5, rank=r, world_size=world_size, pad_ranks=True) for r in range(world_size)]
    truncated = ResumableSampler(n, batch, seed=5, world_size=world_size) if n // world_size >= batch else None
    assert padded[0].batches_per_epoch == (-(-n // world_size)) // batch
    if truncated is not None:
        assert truncated.batches_per_epoch == n // (world_size * batch)
    if n > 100_000:
        return  # the lengths are the point here; the orders are checked on the small sizes
    shares = [s.rank_indices(0) for s in padded]
    assert {len(x) for x in shares} == {-(-n // world_size)}
    interleaved = np.stack(shares, axis=1).reshape(-1)  # rank r holds every N-th position from r
    first_pass = interleaved[:n]
    assert sorted(first_pass) == list(range(n))  # every image once, then the repeats
    assert list(interleaved[n:]) == list(np.resize(first_pass, len(interleaved) - n))


def test_sampler_start_batch_is_one_shot():
    s = ResumableSampler(40, 4, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start_batch(6)
    s.set_epoch(2)  # the trainer sets the epoch again at the loop start: the resume point survives
    assert len(s) == 4
    assert list(s) == full[6:]
    assert list(s) == full  # used once
    s.set_start_batch(3)
    s.set_epoch(3)  # a different epoch discards it
    assert len(list(s)) == 10
    with pytest.raises(ValueError, match="start batch"):
        s.set_start_batch(11)


# ------------------------------------------------------------------------------------------------
# determinism and resume
# ------------------------------------------------------------------------------------------------


def test_same_crops_with_zero_and_two_workers():
    reader = SyntheticDataset(16, size=32, seed=5)
    masking = BatchMasking(grid=(3, 3))
    runs = []
    for workers in (0, 2):
        ds = MultiCropDataset(reader, MultiCropAugmentation(**SMALL_AUG), seed=11)
        sampler = ResumableSampler(len(reader), 4, seed=11)
        sampler.set_epoch(1)
        runs.append(list(_loader(ds, sampler, workers, masking=masking, seed=11)))
    _assert_batches_equal(runs[0], runs[1])
    batch = runs[0][0]
    assert batch["global_crops"].shape == (8, 3, 24, 24) and batch["local_crops"].shape == (8, 3, 12, 12)
    assert batch["masks"].shape == (8, 9)
    # A sample's crops depend only on (seed, epoch, index), not on the batch it lands in.
    ds = MultiCropDataset(reader, MultiCropAugmentation(**SMALL_AUG), seed=11)
    ds.set_epoch(1)
    index = int(batch["indices"][2])
    alone = ds[index]
    assert torch.equal(alone["global_crops"][1], batch["global_crops"][4 + 2])
    assert torch.equal(alone["local_crops"][0], batch["local_crops"][2])
    ds.set_epoch(2)
    assert not torch.equal(ds[index]["global_crops"][1], alone["global_crops"][1])


def _cfg(tmp_path=None, **overrides):
    base = {
        "data.dataset": "synthetic",
        "data.synthetic_size": 20,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "crops.global_size": 16,
        "crops.local_size": 8,
        "crops.n_local": 2,
        "model.patch_size": 4,
        "train.seed": 7,
    }
    base.update(overrides)
    return build_config(overrides=[f"{k}={v}" for k, v in base.items()])


def test_resume_inside_epoch_reproduces_remaining_batches():
    cfg = _cfg(**{"objective.method": "simdinov2", "model.style": "v2"})
    loader, sampler, _ = build_train_loader(cfg, epoch=3)
    uninterrupted = list(loader)
    assert len(uninterrupted) == sampler.batches_per_epoch == 5
    for k in (2, 4):
        resumed_loader, resumed_sampler, _ = build_train_loader(cfg, epoch=3, start_batch=k)
        resumed_sampler.set_epoch(3)  # as a trainer does at the top of its epoch loop
        assert len(resumed_loader) == 5 - k
        _assert_batches_equal(list(resumed_loader), uninterrupted[k:])
    # The next epoch is a different, full epoch.
    sampler.set_epoch(4)
    nxt = list(loader)
    assert len(nxt) == 5 and not torch.equal(nxt[0]["global_crops"], uninterrupted[0]["global_crops"])


# ------------------------------------------------------------------------------------------------
# corrupt files
# ------------------------------------------------------------------------------------------------


def _folder_with_corrupt_files(root):
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(os.path.join(root, f"img{i}_ok.jpg"))
    # Sorted order interleaves them with good files: img0_ok, img1_trunc, ..., img4_text, ..., img7_empty.
    good = open(os.path.join(root, "img0_ok.jpg"), "rb").read()
    bad = {
        "img1_trunc.jpg": good[: len(good) // 2],
        "img4_text.jpg": b"plain text, not a JPEG\n",
        "img7_empty.jpg": b"",
    }
    for name, data in bad.items():
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(data)
    return sorted(os.path.join(root, n) for n in bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_files_are_skipped_counted_and_reported(tmp_path, workers):
    bad_paths = _folder_with_corrupt_files(str(tmp_path))
    reader = UnlabeledFolderDataset(str(tmp_path))
    assert len(reader) == 12
    ds = MultiCropDataset(reader, MultiCropAugmentation(**SMALL_AUG), seed=0)
    sampler = ResumableSampler(len(reader), 3, seed=0)  # 4 batches cover all 12 files
    batches = list(_loader(ds, sampler, workers))
    assert len(batches) == 4
    assert all(b["global_crops"].shape[0] == 6 and b["labels"].shape == (3,) for b in batches)
    assert sum(b["n_skipped"] for b in batches) == 3
    assert sorted(p for b in batches for p in b["skipped"]) == bad_paths
    # The replacement is the next file in the reader's order, and it is a good one.
    bad_index = {reader.path(i): i for i in range(len(reader)) if reader.path(i) in bad_paths}
    for b in batches:
        for path in b["skipped"]:
            assert bad_index[path] + 1 in b["indices"].tolist()
    assert all(reader.path(i) not in bad_paths for b in batches for i in b["indices"].tolist())


def test_all_corrupt_dataset_fails_loudly(tmp_path):
    for name in ("a.jpg", "b.png"):
        (tmp_path / name).write_bytes(b"")
    ds = MultiCropDataset(UnlabeledFolderDataset(str(tmp_path)), MultiCropAugmentation(**SMALL_AUG), seed=0)
    with pytest.raises(RuntimeError, match="all 2 files"):
        ds[0]


# ------------------------------------------------------------------------------------------------
# collate
# ------------------------------------------------------------------------------------------------


def test_collate_is_crop_major_with_per_batch_masks():
    reader = SyntheticDataset(6, size=28, seed=1)
    ds = MultiCropDataset(reader, MultiCropAugmentation(**SMALL_AUG), seed=2)
    samples = [ds[i] for i in (5, 0, 3)]
    masking = BatchMasking(grid=(6, 6))
    batch = collate_multicrop(samples, masking=masking, seed=2, epoch=0, batch_index=9)
    B = 3
    for v in range(2):
        for b in range(B):
            assert torch.equal(batch["global_crops"][v * B + b], samples[b]["global_crops"][v])
            assert torch.equal(batch["local_crops"][v * B + b], samples[b]["local_crops"][v])
    assert batch["labels"].tolist() == [5, 0, 3] and batch["indices"].tolist() == [5, 0, 3]
    assert batch["n_skipped"] == 0 and batch["skipped"] == []
    # Masks come from (seed, epoch, rank, batch index) alone.
    expected = masking(2 * B, mask_rng(2, 0, 9))
    assert torch.equal(batch["masks"], expected) and batch["masks"].shape == (6, 36)
    idx, w = mask_indices_and_weights(expected)
    assert torch.equal(batch["mask_indices"], idx) and torch.equal(batch["mask_weights"], w)
    other = collate_multicrop(samples, masking=masking, seed=2, epoch=0, batch_index=10)
    assert not torch.equal(other["masks"], batch["masks"])
    # Without masking (SimDINO / DINO) and without local crops.
    plain = collate_multicrop(samples, dtype=torch.float16)
    assert plain["masks"] is None and plain["mask_indices"] is None and plain["global_crops"].dtype == torch.float16
    no_local = MultiCropDataset(reader, MultiCropAugmentation(global_size=16, n_local=0), seed=2)
    assert collate_multicrop([no_local[0], no_local[1]])["local_crops"] is None
    with pytest.raises(ValueError, match="batch_index"):
        collate_multicrop(samples, masking=masking, seed=2)


def test_per_sample_mask_fn_is_stacked_crop_major():
    reader = SyntheticDataset(4, size=20, seed=0)

    def mask_fn(rng):
        return rng.random((2, 9)) < 0.3

    ds = MultiCropDataset(reader, MultiCropAugmentation(**SMALL_AUG), seed=1, mask_fn=mask_fn)
    samples = [ds[i] for i in range(3)]
    batch = collate_multicrop(samples)
    for v in range(2):
        for b in range(3):
            assert torch.equal(batch["masks"][v * 3 + b], samples[b]["masks"][v])
    assert torch.equal(ds[1]["masks"], samples[1]["masks"])


def test_build_train_loader_masks_only_for_v2_methods():
    loader, sampler, dataset = build_train_loader(_cfg())
    batch = next(iter(loader))
    assert batch["masks"] is None and batch["global_crops"].shape == (8, 3, 16, 16)
    assert batch["local_crops"].shape == (8, 3, 8, 8) and isinstance(dataset, MultiCropDataset)
    cfg = _cfg(**{"objective.method": "dinov2", "model.style": "v2", "data.num_workers": 2})
    loader, sampler, _ = build_train_loader(cfg, rank=1, world_size=2)
    assert sampler.batches_per_epoch == 2 and len(loader) == 2
    batches = list(loader)
    assert all(b["masks"].shape == (8, 16) for b in batches)  # grid = 16 // 4 = 4x4
    n_masked = [int((b["masks"].sum(1) > 0).sum()) for b in batches]
    assert all(n <= 4 for n in n_masked) and sum(n_masked) > 0


def test_persistent_workers_give_each_epoch_its_own_crops():
    # The workers outlive the epoch (persistent_workers) while the main process moves the epoch on:
    # every epoch must equal a fresh single-process loader's, and differ from the last one.
    def epochs(workers):
        loader, sampler, _ = build_train_loader(_cfg(**{"data.num_workers": workers}))
        out = []
        for e in range(3):
            sampler.set_epoch(e)
            out.append(torch.cat([b["global_crops"] for b in loader]))
        return loader, out

    persistent, with_workers = epochs(2)
    assert persistent.persistent_workers
    _, single = epochs(0)
    for a, b in zip(with_workers, single):
        assert torch.equal(a, b)
    assert not torch.equal(with_workers[0], with_workers[1])

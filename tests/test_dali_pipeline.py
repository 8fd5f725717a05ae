"""The DALI multi-crop loader on the CPU (device_id=None): batch layout, keys shared with the torchvision
loader (order, sharding, resume, per-sample RNG), epochs, corrupt files, Fashion-MNIST, masks, dtypes,
the built-in fallback chain and worker processes.

JPEGs are generated per session (real photos resized to 500x375, quality 90) in a temp folder.
"""
import logging
import os
import shutil

import numpy as np
import pytest
import torch

from flashdino.engine.config import build_config
from flashdino.pipelines import loader as tv_loader
from flashdino.pipelines.augment import MultiCropAugmentation
from flashdino.pipelines.bench import make_jpeg_set
from flashdino.pipelines.dali import build_dali_loader
from flashdino.pipelines.dali import plugin as plugin_mod
from flashdino.pipelines.dali.params import ViewSpec, pack_crop_params
from flashdino.pipelines.dali.source import MultiCropSource
from flashdino.pipelines.fast_masking import FastBatchMasking
from flashdino.pipelines.native import build as native_build

SMALL = ["crops.global_size=64", "crops.local_size=32", "crops.n_local=3", "data.num_workers=0", "train.seed=7"]


@pytest.fixture(scope="module", autouse=True)
def plugin():
    reason = native_build.missing_requirement("off")
    if reason:
        pytest.skip(f"cannot build the DALI plugin here: {reason}")
    # "auto": with nvcc present (CI, the GPU machine) the one shared build carries the CUDA kernel
    # too; a CPU-only build made here first would be reused, and loaded, by the GPU tests.
    path = native_build.ensure_native_plugin(cuda="auto")
    assert path is not None
    assert plugin_mod.load_plugin(path) is not None


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    make_jpeg_set(str(root), 24, size=(500, 375), n_classes=3, seed=1)
    return str(root)


def _cfg(path, *extra):
    return build_config(None, overrides=[f"data.path={path}", "data.batch_size=4"] + SMALL + list(extra))


def _epoch(loader):
    return [b for b in loader]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in ("global_crops", "local_crops", "labels", "indices"):
            assert torch.equal(x[k], y[k]), k


def test_batch_layout_labels_and_order_match_the_torchvision_loader(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    loader, sampler, reader = build_dali_loader(cfg)
    assert loader.use_plugin
    batches = _epoch(loader)
    expected = list(tv_loader.ResumableSampler(len(reader), 4, 7).batches(0))
    assert len(batches) == len(expected) == 6
    for batch, idx in zip(batches, expected):
        assert batch["global_crops"].shape == (8, 3, 64, 64) and batch["global_crops"].dtype == torch.float32
        assert batch["local_crops"].shape == (12, 3, 32, 32)
        assert batch["indices"].tolist() == idx  # same images, same order as the torchvision loader
        assert batch["labels"].tolist() == [reader.labels[i] for i in idx]
        assert batch["n_skipped"] == 0 and batch["skipped"] == []
        assert batch["masks"] is None and batch["mask_indices"] is None
        assert torch.isfinite(batch["global_crops"]).all()
        # crop-major: the two global views of an image are different crops of it
        assert not torch.equal(batch["global_crops"][0], batch["global_crops"][4])


def test_reproducible_and_epoch_dependent(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    a = _epoch(build_dali_loader(cfg)[0])
    b = _epoch(build_dali_loader(cfg)[0])
    _assert_batches_equal(a, b)
    c = _epoch(build_dali_loader(cfg, epoch=1)[0])
    assert not torch.equal(a[0]["global_crops"], c[0]["global_crops"])


def test_consecutive_epochs_reuse_the_pipeline(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    loader, sampler, _ = build_dali_loader(cfg)
    _epoch(loader)
    pipe = loader._pipe
    sampler.set_epoch(1)
    second = _epoch(loader)
    assert loader._pipe is pipe  # no rebuild between consecutive epochs
    _assert_batches_equal(second, _epoch(build_dali_loader(cfg, epoch=1)[0]))


def test_resume_inside_an_epoch(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    full = _epoch(build_dali_loader(cfg, epoch=2)[0])
    loader, sampler, _ = build_dali_loader(cfg, epoch=2, start_batch=3)
    assert len(loader) == 3
    _assert_batches_equal(_epoch(loader), full[3:])
    # the trainer's call: loader.set_epoch(epoch, start_batch)
    loader.set_epoch(2, 4)
    _assert_batches_equal(_epoch(loader), full[4:])


def test_sharding_by_rank(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    seen = []
    for rank in range(2):
        loader, sampler, reader = build_dali_loader(cfg, rank=rank, world_size=2)
        got = [b["indices"].tolist() for b in loader]
        assert got == list(tv_loader.ResumableSampler(len(reader), 4, 7, rank=rank, world_size=2).batches(0))
        seen += sum(got, [])
    assert len(seen) == len(set(seen)) == 24


@pytest.mark.parametrize("style, batches", [("v1", 2), ("v2", 1)])
def test_padded_rank_shares_follow_the_schedule_style(jpeg_dir, style, batches):
    """24 images on 7 ranks at batch 2: the v1 tree pads each share to ceil(24/7) = 4 images (2
    batches), the v2 tree truncates to 3 (1 batch) (spec 1.4). The DALI source gives the last rank,
    whose padded share repeats the permutation's first images, what the torchvision sampler gives."""
    cfg = _cfg(jpeg_dir, "data.batch_size=2", f"optim.schedule_style={style}")
    loader, sampler, reader = build_dali_loader(cfg, rank=6, world_size=7)
    tv_sampler = tv_loader.build_train_sampler(cfg, len(reader), rank=6, world_size=7)
    assert len(loader) == sampler.batches_per_epoch == tv_sampler.batches_per_epoch == batches
    assert [b["indices"].tolist() for b in loader] == list(tv_sampler.batches(0))


def test_reference_params_are_the_torchvision_loaders(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    loader, _, reader = build_dali_loader(cfg, params="reference")
    aug = MultiCropAugmentation.from_config(cfg.crops)
    spec = ViewSpec.from_augmentation(aug)
    source = MultiCropSource(reader, spec, 4, 7, params="reference", augmentation=aug)
    for index in (0, 5, 17):
        out = source.sample(index, epoch=3)
        w, h = 500, 375  # make_jpeg_set writes 80% landscape; read the real size to be exact
        from PIL import Image

        with Image.open(reader.files[index]) as img:
            w, h = img.size
        expected = pack_crop_params(aug.sample_params(w, h, tv_loader.sample_rng(7, 3, index)), spec)
        for got, want in zip(out[2:7], expected):
            assert np.array_equal(got, want)


def _write_corrupt_files(folder, good_jpeg):
    data = open(good_jpeg, "rb").read()
    sos = data.find(b"\xff\xda")
    files = {}
    files["truncated.jpg"] = data[: len(data) // 2]
    files["text.jpg"] = b"this is not an image\n" * 20
    files["empty.jpg"] = b""
    from PIL import Image

    png = os.path.join(folder, "tmp.png")
    Image.open(good_jpeg).save(png)
    files["truncated.png"] = open(png, "rb").read()[:-40]
    os.remove(png)
    # passes the structural check but names an undefined Huffman table: DALI's decoder fails
    bad = bytearray(data)
    bad[sos + 2 + 8] = 7
    files["bad_huffman.jpg"] = bytes(bad)
    for name, content in files.items():
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(content)
    return sorted(os.path.join(folder, n) for n in files)


def test_corrupt_files_are_skipped_counted_and_reported(jpeg_dir, tmp_path, caplog):
    root = tmp_path / "mixed"
    shutil.copytree(jpeg_dir, root)
    folder = root / "class_001"
    corrupt = _write_corrupt_files(str(folder), sorted(folder.glob("*.jpg"))[0].as_posix())
    from PIL import Image

    # a GIF named .jpg: DALI cannot decode GIF, PIL can -> handed over transcoded, not skipped
    Image.open(sorted(folder.glob("img_*.jpg"))[1]).save(folder / "disguised.jpg", format="GIF")
    cfg = build_config(None, overrides=[f"data.path={root}", "data.batch_size=6"] + SMALL)
    loader, sampler, reader = build_dali_loader(cfg)
    assert len(reader) == 30
    with caplog.at_level(logging.WARNING):
        batches = _epoch(loader)  # 5 batches cover every file once
    assert len(batches) == 5
    skipped = [p for b in batches for p in b["skipped"]]
    assert sum(b["n_skipped"] for b in batches) == len(skipped) == loader.total_skipped
    assert set(skipped) == set(corrupt)
    for b in batches:
        assert b["global_crops"].shape[0] == 12 and torch.isfinite(b["global_crops"]).all()
    used = {i for b in batches for i in b["indices"].tolist()}
    assert not used & {reader.files.index(p) for p in corrupt}
    assert reader.files.index(str(folder / "disguised.jpg")) in used
    # the file DALI's decoder rejected was found and blocked; every distinct file logged once
    assert loader.blocklist == {reader.files.index(str(folder / "bad_huffman.jpg"))}
    logged = [r.getMessage() for r in caplog.records if "skipped unusable image" in r.getMessage()]
    assert len(logged) == len(corrupt)
    assert any("truncated" in m and "truncated.jpg" in m for m in logged)


def test_fashion_mnist_pixels_without_decoding():
    cfg = build_config("demo", overrides=["data.batch_size=8", "data.num_workers=0"])
    loader, sampler, reader = build_dali_loader(cfg)
    assert not loader._make_source(0, 0).encoded
    it = iter(loader)
    for _ in range(2):
        b = next(it)
        g, l, n_local = cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local
        assert b["global_crops"].shape == (16, 3, g, g) and b["local_crops"].shape == (8 * n_local, 3, l, l)
        assert b["labels"].tolist() == [int(reader.labels[i]) for i in b["indices"].tolist()]
        assert set(b["labels"].tolist()) <= set(range(10))
        # grayscale source: the three channels agree after undoing the (equal) normalization
        x = b["global_crops"]
        assert torch.allclose(x[:, 0], x[:, 1], atol=1e-5) and torch.allclose(x[:, 1], x[:, 2], atol=1e-5)
    loader.close()


def test_simdinov2_masks_are_per_batch_and_keyed(jpeg_dir):
    cfg = _cfg(jpeg_dir, "objective.method=simdinov2", "model.style=v2", "model.patch_size=16")
    a = _epoch(build_dali_loader(cfg)[0])
    b = _epoch(build_dali_loader(cfg)[0])
    masking = FastBatchMasking((4, 4))
    for k, (x, y) in enumerate(zip(a, b)):
        assert x["masks"].shape == (8, 16) and x["masks"].dtype == torch.bool
        assert torch.equal(x["masks"], y["masks"])
        assert torch.equal(x["masks"], masking(8, tv_loader.mask_rng(7, 0, k, 0)))
        flat = x["masks"].reshape(-1).nonzero().reshape(-1)
        assert torch.equal(x["mask_indices"], flat)
        assert x["mask_weights"].shape == flat.shape


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_training_dtypes(jpeg_dir, precision, dtype):
    ref = next(iter(build_dali_loader(_cfg(jpeg_dir))[0]))
    got = next(iter(build_dali_loader(_cfg(jpeg_dir, f"train.precision={precision}"))[0]))
    for k in ("global_crops", "local_crops"):
        assert got[k].dtype == dtype
        assert torch.allclose(got[k].float(), ref[k].to(dtype).float(), rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-3)


def test_builtin_chain_fallback_runs(jpeg_dir):
    cfg = _cfg(jpeg_dir, "train.precision=bf16")
    loader, _, _ = build_dali_loader(cfg, use_plugin=False)
    assert not loader.use_plugin
    b = next(iter(loader))
    assert b["global_crops"].shape == (8, 3, 64, 64) and b["global_crops"].dtype == torch.bfloat16
    assert torch.isfinite(b["local_crops"].float()).all()
    loader.close()


def test_missing_plugin_warns_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(plugin_mod, "_state", {"path": None, "tried": False, "warned": False, "reason": None})
    monkeypatch.setattr(plugin_mod, "candidates", lambda: [str(tmp_path / "nothing.so")])
    with caplog.at_level(logging.WARNING, logger=plugin_mod.__name__):
        assert plugin_mod.load_plugin() is None
        assert plugin_mod.load_plugin() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "built-in op chain" in warnings[0] and "nothing.so" in warnings[0]


def test_worker_processes_give_the_same_batches(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    serial = _epoch(build_dali_loader(cfg)[0])
    loader, _, _ = build_dali_loader(_cfg(jpeg_dir, "data.num_workers=2"))
    assert loader.py_workers == 2
    _assert_batches_equal(_epoch(loader), serial)
    loader.close()


def test_bad_arguments_are_named(jpeg_dir):
    cfg = _cfg(jpeg_dir)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            build_dali_loader(cfg, device_id=0)
    with pytest.raises(ValueError, match="params must be"):
        build_dali_loader(cfg, params="random")


@pytest.mark.gpu
def test_gpu_loader_matches_cpu_loader(jpeg_dir):
    """device_id=0: mixed decode + GPU resize + CUDA kernel; crops land on the GPU in the training dtype
    and agree with the CPU pipeline (decoders may differ slightly: IDCT / hardware decoder)."""
    reason = native_build.missing_requirement("on")
    if reason:
        pytest.skip(f"the plugin's CUDA kernel cannot be built here: {reason}")
    path = native_build.ensure_native_plugin(cuda="on")
    plugin_mod.load_plugin(path)
    # The CUDA kernel, not the built-in fallback chain: a plugin built without CUDA fails here.
    assert plugin_mod.has_backend("gpu"), f"the DALI plugin {path} has no GPU kernel (built without CUDA?)"
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = _cfg(jpeg_dir, f"train.precision={precision}", "objective.method=simdinov2", "model.style=v2",
                   "model.patch_size=16")  # fmt: skip
        gpu_loader, _, _ = build_dali_loader(cfg, device_id=0)
        cpu_batches = _epoch(build_dali_loader(cfg)[0])
        gpu_batches = _epoch(gpu_loader)
        assert gpu_loader.use_plugin == plugin_mod.has_backend("gpu")
        for g, c in zip(gpu_batches, cpu_batches):
            for key in ("global_crops", "local_crops", "labels", "masks", "mask_indices", "mask_weights"):
                assert g[key].device.type == "cuda", key
            assert g["global_crops"].dtype == dtype
            assert torch.equal(g["indices"], c["indices"])
            assert torch.equal(g["masks"].cpu(), c["masks"])
            for key in ("global_crops", "local_crops"):
                diff = (g[key].float().cpu() - c[key].float()).abs().flatten(1).mean(1)
                assert diff.max() < 0.05, f"{key}: GPU and CPU pipelines differ by {diff.max():.4f}"
        gpu_loader.close()

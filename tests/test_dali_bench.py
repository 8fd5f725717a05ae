"""`flashdino data bench` on the CPU: generates the JPEG set, measures DALI-CPU and torchvision, writes the
results file (JSON + Markdown with date, device, versions and the exact command)."""
import argparse
import glob
import json

import numpy as np
import pytest
from PIL import Image

from flashdino.pipelines import bench


def test_make_jpeg_set_writes_imagenet_like_files(tmp_path):
    paths = bench.make_jpeg_set(str(tmp_path), 6, size=(500, 375), n_classes=2, seed=0)
    assert len(paths) == 6 and len(glob.glob(str(tmp_path / "class_*"))) == 2
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "JPEG" and sorted(img.size) == [375, 500]


def test_bench_runs_the_cpu_variants_and_writes_results(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([
        "--data", str(tmp_path / "jpegs"), "--make-jpegs", "12", "--batch-size", "4", "--workers", "0",
        "--batches", "2", "--warmup", "1", "--global-size", "64", "--local-size", "32", "--n-local", "2",
        "--output", str(tmp_path / "out"),
    ])  # fmt: skip
    assert bench.main(args) == 0
    (json_path,) = glob.glob(str(tmp_path / "out" / "*.json"))
    report = json.load(open(json_path))
    results = {r["variant"]: r for r in report["results"]}
    assert set(results) == {"dali-gpu", "dali-cpu", "torchvision"}
    for v in ("dali-cpu", "torchvision"):
        assert results[v]["images"] == 8 and results[v]["images_per_s"] > 0, results[v]
    assert "skipped" in results["dali-gpu"] or "images_per_s" in results["dali-gpu"]
    meta = report["meta"]
    assert meta["date"] and meta["device"]["name"] and meta["cpu"]["cores"] >= 1 and "commit" in meta["git"]
    assert meta["versions"]["torch"] and meta["versions"]["python"]
    assert any(k.startswith("nvidia-dali") and v for k, v in meta["versions"].items())
    # called from Python: the equivalent command line, rebuilt from the parsed arguments
    assert meta["command"].startswith("flashdino data bench") and "--make-jpegs 12" in meta["command"]
    assert report["settings"]["make_jpegs"] == 12 and report["settings"]["batch_size"] == 4
    markdown = open(json_path[:-5] + ".md").read()
    assert "| dali-cpu |" in markdown and meta["command"] in markdown and "- git commit:" in markdown
    assert "images/s" in capsys.readouterr().out


def test_bench_rejects_unknown_variant(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--data", str(tmp_path), "--variants", "dali-tpu"])
    assert bench.main(args) == 2


def test_make_jpegs_from_a_carried_photo_folder(tmp_path, capsys):
    """The GPU machine has no Debian photos: --photos takes a folder of them carried along."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, color in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (800, 600), color).save(photos / f"p{i}.jpg", quality=95)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    common = ["--batch-size", "2", "--workers", "0", "--batches", "1", "--warmup", "0", "--global-size", "32",
              "--local-size", "16", "--n-local", "1", "--variants", "torchvision", "--output", str(tmp_path / "out")]
    args = parser.parse_args(["--data", str(tmp_path / "jpegs"), "--make-jpegs", "4", "--photos", str(photos)] + common)
    assert bench.main(args) == 0
    written = sorted(glob.glob(str(tmp_path / "jpegs" / "class_*" / "*.jpg")))
    assert len(written) == 4
    with Image.open(written[0]) as img:  # a crop of photo 0 (red), not of an installed photo
        r, g, b = img.convert("RGB").getpixel((10, 10))
        assert r > 150 and g < 80
    (tmp_path / "empty").mkdir()
    args = parser.parse_args(["--data", str(tmp_path / "jpegs2"), "--make-jpegs", "4", "--photos",
                              str(tmp_path / "empty")] + common)
    assert bench.main(args) == 2
    assert "no photos" in capsys.readouterr().err


def test_photo_folder_from_the_environment_replaces_the_debian_photos(tmp_path, monkeypatch):
    # The GPU machine's tests build their JPEG sets from the photos carried in .gpu/photos.
    photos = tmp_path / "carried"
    photos.mkdir()
    Image.new("RGB", (640, 480), (10, 120, 200)).save(photos / "a.jpg", quality=95)
    monkeypatch.setenv(bench.PHOTOS_ENV, str(photos))
    assert bench.default_photo_paths() == [str(photos / "a.jpg")]
    paths = bench.make_jpeg_set(str(tmp_path / "set"), 2, size=(64, 48), n_classes=1)
    with Image.open(paths[0]) as img:
        assert np.asarray(img.convert("RGB")).mean(axis=(0, 1))[2] > 150  # crops of the carried photo
    monkeypatch.setenv(bench.PHOTOS_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=bench.PHOTOS_ENV):
        bench.make_jpeg_set(str(tmp_path / "none"), 1)


def test_micro_batches_keep_every_view_of_the_same_images():
    import torch

    B, n_local = 5, 3
    ids = torch.arange(B).float()
    batch = {"global_crops": torch.cat([ids + 100 * v for v in range(2)]).view(-1, 1),
             "local_crops": torch.cat([ids + 1000 * (v + 1) for v in range(n_local)]).view(-1, 1)}
    chunks = list(bench.micro_batches(batch, 2))
    assert len(chunks) == 3
    seen = []
    for g, l in chunks:
        images = (g[: len(g) // 2].flatten() % 100).long().tolist()
        assert (g.flatten() % 100).long().tolist() == images * 2  # both global views of these images
        assert (l.flatten() % 1000).long().tolist() == images * n_local
        seen += images
    assert seen == list(range(B))
    only_global = list(bench.micro_batches({"global_crops": batch["global_crops"], "local_crops": None}, 4))
    assert [l for _, l in only_global] == [None, None] and sum(len(g) for g, _ in only_global) == 2 * B


def test_a_failed_vit_step_keeps_the_measured_throughput(monkeypatch):
    import torch

    def failing_share(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB\nmore lines")

    monkeypatch.setattr(bench, "vit_step_share", failing_share)
    result = {"variant": "dali-gpu", "images_per_s": 1234.5}
    bench.add_vit_step(result, loader=None, sampler=None, steps=2, device_index=0)
    assert result["images_per_s"] == 1234.5 and "vit_step" not in result
    assert result["vit_step_error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 9 GiB"
    meta = {"date": "d", "device": {"name": "H100"}, "versions": {"torch": "t"}, "git": {"commit": "abc"},
            "command": "cmd", "cpu": {"model": "c", "cores": 2}}
    report = {"meta": meta, "results": [result],
              "settings": {"global_size": 224, "n_local": 10, "local_size": 96, "batch_size": 256,
                           "precision": "bf16", "blur": "pil", "batches": 30, "warmup": 3}}
    assert "| dali-gpu | 1234.5 | ViT-B/16 step not measured: OutOfMemoryError" in bench.to_markdown(report)

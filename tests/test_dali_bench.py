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
    for key in ("date", "device", "torch", "dali", "python"):
        assert report["environment"][key]
    assert report["command"]  # the process's own command line (here: pytest's)
    assert report["settings"]["make_jpegs"] == 12 and report["settings"]["batch_size"] == 4
    markdown = open(json_path[:-5] + ".md").read()
    assert "| dali-cpu |" in markdown and report["command"] in markdown
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

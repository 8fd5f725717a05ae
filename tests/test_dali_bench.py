"""`flashdino data bench` on the CPU: generates the JPEG set, measures DALI-CPU and torchvision, writes the
results file (JSON + Markdown with date, device, versions and the exact command)."""
import argparse
import glob
import json

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

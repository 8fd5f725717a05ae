"""The embedded default: `flashdino train` with no data argument runs the demo preset on Fashion-MNIST,
then the k-NN with its two baselines, the plots and the summary. Run end to end here for a few steps
on a small Fashion-MNIST subset written in the original idx format."""
import gzip
import json
import os
import struct

import numpy as np
import pytest

from flashdino.engine.cli import build_parser
from flashdino.engine.cli import main as cli_main
from flashdino.pipelines.fashion_mnist import DEFAULT_ROOT, FashionMNIST


def _write_idx(path, array, magic):
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">" + "I" * (1 + array.ndim), magic, *array.shape))
        fh.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="module")
def fmnist_subset(tmp_path_factory):
    """600 train / 200 test images: real Fashion-MNIST when installed, else random pixels."""
    root = tmp_path_factory.mktemp("fmnist")
    sizes = {"train": 600, "t10k": 200}
    for prefix, split in (("train", "train"), ("t10k", "test")):
        n = sizes[prefix]
        if os.path.isfile(os.path.join(DEFAULT_ROOT, "train-images-idx3-ubyte.gz")):
            full = FashionMNIST(DEFAULT_ROOT, split)
            images, labels = full.images[:n], full.labels[:n].astype(np.uint8)
        else:
            images = np.random.randint(0, 256, size=(n, 28, 28), dtype=np.uint8)
            labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz"), images, 2051)
        _write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz"), labels, 2049)
    return str(root)


def test_train_without_arguments_is_the_demo():
    from flashdino.engine.commands.train import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert cfg.preset == "demo" and cfg.data.dataset == "fashion_mnist" and cfg.data.path is None
    assert cfg.eval.after_train and cfg.eval.knn_k == 20 and cfg.eval.knn_temperature == 0.07
    assert cfg.model.img_size == cfg.crops.global_size == cfg.eval.eval_size == cfg.eval.resize_size == 28


def test_demo_runs_end_to_end_and_is_reported(fmnist_subset, tmp_path, monkeypatch):
    """`flashdino train` in a child process (as a user runs it) through the results-file writer."""
    from flashdino.engine.eval import demo_report
    from flashdino.profiling import env

    # The checkout may move on while a long run trains: the report names the commit it started from.
    commits = iter(["commit-at-start", "commit-later", "commit-later"])
    monkeypatch.setattr(env, "git_info", lambda *a: {"commit": next(commits), "dirty": False})
    out, results = str(tmp_path / "run"), str(tmp_path / "results")
    assert demo_report.main(["--output-dir", out, "--results", results, f"data.path={fmnist_subset}",
                             "train.max_steps=3", "data.batch_size=32", "data.num_workers=0", "train.log_every=1",
                             "optim.iters_per_epoch=0"]) == 0  # the 600-image subset has fewer than 50 batches
    with open(os.path.join(out, "demo_stdout.txt")) as fh:
        printed = fh.read()
    for text in ("flashdino run summary", "this run (teacher)", "same network, random init", "raw pixels",
                 "gain over random init", "attention_maps.png", "collapse"):
        assert text in printed, text
    with open(os.path.join(out, "knn_after_training.json")) as fh:
        record = json.load(fh)
    assert record["ks"] == [20] and record["temperature"] == 0.07 and record["step"] == 3
    for name in ("trained", "random_init", "raw_pixels"):
        res = record["results"][name]
        assert (res["n_train"], res["n_test"]) == (600, 200)
        assert 0.0 <= res["knn"]["20"]["top1"] <= 100.0
    assert record["results"]["raw_pixels"]["dim"] == 784  # grayscale: one channel, not three copies
    for name in ("checkpoint.pth", "loss_curves.png", "attention_maps.png", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    assert [r["step"] for r in records if "total_loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "collapse/effective_rank" in r] == [1, 2, 3]
    assert os.path.isdir(os.path.join(out, "tensorboard"))
    # the results file: what ran, where, how long, what it reached
    reports = sorted(os.listdir(results))
    assert len(reports) == 2 and reports[0].startswith("demo-cpu-") and reports[0].endswith(".json")
    with open(os.path.join(results, reports[0])) as fh:
        report = json.load(fh)
    assert report["kind"] == "flashdino.demo" and report["meta"]["command"].startswith("flashdino train --output-dir")
    assert report["wall_seconds"] > 0 and report["train"]["steps"] == 3
    assert report["meta"]["git"]["commit"] == "commit-at-start"
    assert report["knn"]["top1_top5"]["trained"] == record["results"]["trained"]["knn"]["20"]
    with open(os.path.join(results, reports[1])) as fh:
        assert "| raw pixels |" in fh.read()


def test_missing_fashion_mnist_names_the_install_command(tmp_path, monkeypatch, capsys):
    empty = str(tmp_path / "no-dataset")
    os.makedirs(empty)
    monkeypatch.setattr("flashdino.pipelines.datasets.FASHION_MNIST_ROOT", empty)
    monkeypatch.setattr("flashdino.engine.eval.data.FASHION_MNIST_ROOT", empty)
    assert cli_main(["train", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")  # reported before any training


def test_a_schedule_fitted_to_the_time_budget_is_named_in_the_report():
    from flashdino.engine.eval.demo_report import _fit_note

    fit = {"planned_epochs": 30, "fitted_epochs": 21, "at_step": 100, "seconds_per_step": 0.0325,
           "max_change_of_past_values": {"lr": 0.0, "wd": 1.5e-6}}
    note = _fit_note(fit)
    assert "21 of 30 planned epochs" in note and "32.5 ms/step" in note and "step 100" in note
    assert "lr 0" in note and "wd 1.5e-06" in note
    assert _fit_note(dict(fit, fitted_epochs=30)) == "" and _fit_note(None) == ""

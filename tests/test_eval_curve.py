"""`flashdino eval curve`: the k-NN learning curve over a run's step-numbered checkpoints."""
import json
import os

import torch

from flashdino.engine.cli import main as cli_main
from flashdino.engine.eval.curve_cli import select

TINY_RUN = [
    "data.dataset=synthetic", "data.synthetic_size=64", "data.batch_size=8", "data.num_workers=0",
    "model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
    "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "head.hidden_dim=32", "head.bottleneck_dim=16",
    "optim.epochs=3", "optim.iters_per_epoch=0", "optim.warmup_epochs=1", "train.checkpoint_every=0", "train.keep_checkpoints=5",
    "train.log_every=4", "eval.after_train=true", "eval.knn_k=5", "eval.eval_size=32", "eval.resize_size=32",
    "log.plots=false", "log.tensorboard=false", "log.progress_bar=false", "runtime.compile=none",
]


def test_every_nth_checkpoint_and_always_the_last():
    ckpts = [(s, f"c{s}") for s in (8, 16, 24, 32, 40)]
    assert [s for s, _ in select(ckpts, 1)] == [8, 16, 24, 32, 40]
    assert [s for s, _ in select(ckpts, 2)] == [8, 24, 40]
    assert [s for s, _ in select(ckpts, 3)] == [8, 32, 40]
    assert select([], 2) == []


def test_curve_points_equal_knn_of_each_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli_main(["train", "--output-dir", run] + TINY_RUN) == 0
    steps = sorted(int(f[len("checkpoint_step"):-4]) for f in os.listdir(run) if f.startswith("checkpoint_step"))
    assert steps == [8, 16, 24]  # one per epoch end
    first = torch.load(os.path.join(run, "checkpoint_step8.pth"), weights_only=False)["teacher"]
    last = torch.load(os.path.join(run, "checkpoint_step24.pth"), weights_only=False)["teacher"]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the points are different networks
    capsys.readouterr()

    results = str(tmp_path / "results")
    assert cli_main(["eval", "curve", "--run", run, "--every", "2", "--device", "cpu", "--num-workers", "0",
                     "--output", results]) == 0
    with open(os.path.join(results, "knn_curve.json")) as fh:
        curve = json.load(fh)
    assert [p["step"] for p in curve["points"]] == [8, 24] and curve["k"] == 5
    assert set(curve["baselines"]) == {"random_init", "raw_pixels"}
    assert os.path.getsize(os.path.join(results, "knn_curve.png")) > 0
    meta = curve["meta"]  # a results file says when, where, with what and how it was measured
    assert meta["date"] and meta["device"]["type"] == "cpu" and meta["versions"]["torch"] and meta["command"]
    for point in curve["points"]:
        out = str(tmp_path / f"knn{point['step']}.json")
        assert cli_main(["eval", "knn", "--checkpoint", point["checkpoint"], "--k", "5", "--device", "cpu",
                         "--num-workers", "0", "--output", out]) == 0
        with open(out) as fh:
            single = json.load(fh)["results"]["trained"]["knn"]["5"]
        assert (point["top1"], point["top5"]) == (single["top1"], single["top5"])
    # the last point is the trained network the run itself evaluated after training
    with open(os.path.join(run, "knn_after_training.json")) as fh:
        after = json.load(fh)["results"]["trained"]["knn"]["5"]
    assert curve["points"][-1]["top1"] == after["top1"]


def test_a_run_without_step_checkpoints_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pth").write_bytes(b"")
    assert cli_main(["eval", "curve", "--run", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "keep_checkpoints" in err and "Traceback" not in err
    assert cli_main(["eval", "curve", "--run", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err

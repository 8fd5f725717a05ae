"""Linear probes (spec 5.3 / 5.4): SGD steps against float64 NumPy, feature slicing, the CLI."""
import json
import math
import os

import numpy as np
import pytest
import torch

from flashdino.engine.eval.linear import (LinearProbes, ProbeSpec, cached_batches, cosine_lr, feature_columns,
                                          probe_specs, train_linear_probes)


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def test_two_sgd_steps_match_numpy_float64():
    dim, classes, batch, lr, momentum = 6, 4, 8, 0.05, 0.9
    batches = [(torch.randn(batch, dim), torch.randint(0, classes, (batch,))) for _ in range(2)]
    spec = ProbeSpec(1, False, lr)
    torch.manual_seed(11)  # the trainer initialises its probes under torch.manual_seed(seed)
    init = LinearProbes([spec], dim, 1, False, classes).heads[0]
    w, b = init.weight.detach().double().numpy().copy(), init.bias.detach().double().numpy().copy()
    assert abs(w.std() - 0.01) < 0.01 and not b.any()  # N(0, 0.01^2) weights, zero bias
    result = train_linear_probes(lambda epoch: iter(batches), 2, batches[0][0], batches[0][1], specs=[spec], dim=dim,
                                 n_max=1, has_avgpool=False, num_classes=classes, epochs=1, batch_size=batch,
                                 momentum=momentum, schedule="iter", seed=11)
    buf_w = buf_b = None
    for it, (x, y) in enumerate(batches):
        x, y = x.double().numpy(), y.numpy()
        p = _softmax(x @ w.T + b)
        p[np.arange(batch), y] -= 1.0
        gw, gb = p.T @ x / batch, p.mean(0)
        buf_w = gw if buf_w is None else momentum * buf_w + gw
        buf_b = gb if buf_b is None else momentum * buf_b + gb
        step_lr = lr * batch / 256 * 0.5 * (1 + math.cos(math.pi * it / 2))
        w, b = w - step_lr * buf_w, b - step_lr * buf_b
    head = result.probes.heads[0]
    np.testing.assert_allclose(head.weight.detach().double().numpy(), w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(head.bias.detach().double().numpy(), b, rtol=1e-5, atol=1e-7)


def test_cosine_lr():
    assert cosine_lr(0.4, 0.0) == 0.4 and cosine_lr(0.4, 1.0) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(0.4, 0.5) == pytest.approx(0.2)
    assert cosine_lr(0.4, 0.25) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))


def test_feature_columns_layout():
    d = 5  # features: [cls_{L-2}, cls_{L-1}, cls_L, avg] each 5 wide
    assert feature_columns(ProbeSpec(1, False, 0.1), d, 3, True).tolist() == list(range(10, 15))
    assert feature_columns(ProbeSpec(2, True, 0.1), d, 3, True).tolist() == list(range(5, 15)) + list(range(15, 20))
    with pytest.raises(ValueError, match="needs 4 blocks"):
        feature_columns(ProbeSpec(4, False, 0.1), d, 3, True)
    with pytest.raises(ValueError, match="avgpool"):
        feature_columns(ProbeSpec(1, True, 0.1), d, 3, False)


def test_probe_sweep_learns_separable_features():
    classes, d, n = 6, 8, 1200
    centers = 3 * torch.randn(classes, 3 * d)
    labels = torch.randint(0, classes, (n,))
    feats = centers[labels] + torch.randn(n, 3 * d)
    val_labels = torch.randint(0, classes, (300,))
    val = centers[val_labels] + torch.randn(300, 3 * d)
    specs = probe_specs([1, 2], [False, True], [0.01, 1.0])
    result = train_linear_probes(cached_batches(feats, labels, 64, seed=0), math.ceil(n / 64), val, val_labels,
                                 specs=specs, dim=d, n_max=2, has_avgpool=True, num_classes=classes, epochs=3,
                                 batch_size=64, seed=0)
    assert len(result.final) == 8 and len(result.history) == 3
    assert result.best["top1"] > 90.0
    assert result.best_over_epochs["top1"] >= result.best["top1"] - 1e-9
    record = result.to_dict()
    assert {p["probe"] for p in record["probes"]} == {s.name for s in specs}


def _checkpoint(tmp_path):
    from flashdino.engine.config import build_config, to_dict
    from flashdino.engine.meta_arch import SSLMetaArch

    cfg = build_config(None, None, [
        "data.dataset=synthetic", "data.synthetic_size=48", "model.img_size=32", "model.patch_size=8",
        "model.embed_dim=16", "model.depth=2", "model.num_heads=2", "crops.global_size=32", "crops.local_size=16",
        "head.hidden_dim=16", "head.bottleneck_dim=8", "eval.eval_size=32", "eval.resize_size=32"])
    path = os.path.join(tmp_path, "checkpoint.pth")
    torch.save({"teacher": SSLMetaArch(cfg).teacher.state_dict(), "config": to_dict(cfg),
                "train_state": {"step": 1}}, path)
    return path


def test_linear_cli_fast_and_augmented(tmp_path, capsys):
    from flashdino.engine.cli import main as cli_main

    path = _checkpoint(tmp_path)
    common = ["eval", "linear", "--checkpoint", path, "--device", "cpu", "--num-workers", "0", "--batch-size", "16"]
    out = os.path.join(tmp_path, "fast.json")
    assert cli_main(common + ["--epochs", "2", "--n-last-blocks", "1", "2", "--output", out]) == 0
    with open(out) as fh:
        record = json.load(fh)
    assert len(record["result"]["probes"]) == 2 * 2 * 7 and record["n_train"] == 48
    out2 = os.path.join(tmp_path, "aug.json")
    assert cli_main(common + ["--protocol", "v1", "--epochs", "2", "--iters-per-epoch", "5", "--probe-batch-size", "8",
                              "--n-last-blocks", "2", "--output", out2]) == 0
    with open(out2) as fh:
        record = json.load(fh)
    assert record["settings"]["augment"] is True and record["settings"]["schedule"] == "epoch"
    assert [h["epoch"] for h in record["result"]["history"]] == [1, 2]
    assert record["result"]["best_over_epochs"]["top1"] >= 0.0
    printed = capsys.readouterr().out
    assert "best top-1 over epochs" in printed


def test_linear_cli_rejects_too_many_blocks(tmp_path, capsys):
    from flashdino.engine.cli import main as cli_main

    path = _checkpoint(tmp_path)
    assert cli_main(["eval", "linear", "--checkpoint", path, "--device", "cpu", "--n-last-blocks", "5"]) == 2
    assert "exceeds the backbone's 2 blocks" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [([], "fp16"), (["--precision", "fp32"], "fp32"), (["--precision", "bf16"], "bf16")])
def test_linear_settings_explicit_precision_overrides_the_protocol(flags, expected):
    import argparse

    from flashdino.engine.eval.linear_cli import _settings, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--checkpoint", "x.pth", "--protocol", "v2"] + flags)
    assert _settings(args)["precision"] == expected

"""Weighted k-NN (spec 5.1) against an independent brute-force NumPy float64 computation."""
import json
import os

import numpy as np
import pytest
import torch

from flashdino.engine.eval.knn import knn_accuracy, knn_predict, nearest_neighbors, vote


def brute_force_scores(train, train_labels, test, k, temperature, num_classes):
    """Plain NumPy float64: normalize, full similarity matrix, sort, exp-weighted class votes."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    scores = np.zeros((len(test), num_classes))
    for q in range(len(test)):
        order = np.argsort(-sims[q], kind="stable")[:k]
        for j in order:
            scores[q, train_labels[j]] += np.exp(sims[q, j] / temperature)
    return scores


def _random_problem(n_train=400, n_test=150, dim=12, classes=7, dtype=torch.float64, noise=0.9):
    # Class-dependent means so the neighbours carry label information (accuracy far from chance).
    labels = torch.randint(0, classes, (n_train,))
    test_labels = torch.randint(0, classes, (n_test,))
    means = torch.randn(classes, dim, dtype=dtype)
    train = means[labels] + noise * torch.randn(n_train, dim, dtype=dtype)
    test = means[test_labels] + noise * torch.randn(n_test, dim, dtype=dtype)
    return train, labels, test, test_labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunks", [(1024, 65536), (7, 33), (16, 8)])
def test_top1_equals_brute_force(dtype, chunks):
    train, labels, test, _ = _random_problem(dtype=dtype, noise=3.0)  # mixed neighbourhoods: many classes vote
    classes = int(labels.max()) + 1
    preds = knn_predict(train, labels, test, ks=(1, 5, 20), temperature=0.07,
                        query_chunk=chunks[0], train_chunk=chunks[1])
    for k, top in preds.items():
        expected = brute_force_scores(train.numpy(), labels.numpy(), test.numpy(), k, 0.07, classes)
        if dtype == torch.float64:  # exact agreement, every query
            np.testing.assert_array_equal(top[:, 0].numpy(), expected.argmax(1))
        else:  # float32 similarities: exact wherever the best two classes are not within fp32 rounding
            srt = np.sort(expected, axis=1)
            decided = srt[:, -1] > srt[:, -2] * (1 + 1e-4)
            assert decided.mean() > 0.9
            np.testing.assert_array_equal(top[:, 0].numpy()[decided], expected.argmax(1)[decided])
        if k < 20:
            continue
        # top-5 set agrees wherever the brute-force scores are not tied (or within rounding) at the cut
        srt = np.sort(expected, axis=1)[:, ::-1]
        clear = srt[:, 4] > srt[:, 5] * (1 + (1e-9 if dtype == torch.float64 else 1e-4))
        assert clear.mean() > 0.3
        got = np.sort(top[:, :5].numpy()[clear], axis=1)
        want = np.sort(np.argsort(-expected, axis=1)[:, :5][clear], axis=1)
        np.testing.assert_array_equal(got, want)


def test_accuracy_matches_brute_force_and_beats_chance():
    train, labels, test, test_labels = _random_problem(n_train=600, n_test=300)
    acc = knn_accuracy(train, labels, test, test_labels, ks=(10, 20), train_chunk=50, query_chunk=64)
    for k in (10, 20):
        scores = brute_force_scores(train.numpy(), labels.numpy(), test.numpy(), k, 0.07, 7)
        top1 = 100.0 * np.mean(scores.argmax(1) == test_labels.numpy())
        # top-5 hit: the true class has a positive score and fewer than 5 classes score higher
        true = scores[np.arange(len(scores)), test_labels.numpy()]
        top5 = 100.0 * np.mean((true > 0) & ((scores > true[:, None]).sum(1) < 5))
        assert acc[k]["top1"] == pytest.approx(top1, abs=1e-9)
        assert acc[k]["top5"] == pytest.approx(top5, abs=1e-9)
        assert acc[k]["top1"] > 100.0 / 7 + 20


def test_nearest_neighbors_sorted_and_exact():
    train = torch.randn(300, 8, dtype=torch.float64)
    test = torch.randn(40, 8, dtype=torch.float64)
    sims, idx = nearest_neighbors(train, test, 25, query_chunk=9, train_chunk=17)
    full = (test @ train.T).numpy()
    want = np.argsort(-full, axis=1)[:, :25]
    np.testing.assert_array_equal(idx.numpy(), want)
    np.testing.assert_allclose(sims.numpy(), np.take_along_axis(full, want, 1), rtol=0, atol=1e-12)


def test_vote_is_finite_for_unnormalized_similarities():
    sims = torch.tensor([[900.0, 899.0, 10.0]], dtype=torch.float64)
    scores = vote(sims, torch.tensor([[0, 1, 1]]), 2, temperature=0.07)
    assert torch.isfinite(scores).all() and scores.argmax() == 0


def test_bad_inputs_have_clear_errors():
    train, labels, test, test_labels = _random_problem(n_train=30, n_test=5)
    with pytest.raises(ValueError, match="k = 31 exceeds the 30 train"):
        knn_predict(train, labels, test, ks=(31,))
    with pytest.raises(ValueError, match="unlabeled"):
        knn_predict(train, torch.full_like(labels, -1), test)
    with pytest.raises(ValueError, match="12-d but test features are 5-d"):
        knn_predict(train, labels, test[:, :5])
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, test, temperature=0.0)


def test_knn_cli_on_a_checkpoint_with_baselines(tmp_path, capsys):
    from flashdino.engine.cli import main as cli_main
    from flashdino.engine.config import build_config, to_dict
    from flashdino.engine.meta_arch import SSLMetaArch

    cfg = build_config(None, None, [
        "data.dataset=synthetic", "data.synthetic_size=64", "model.img_size=32", "model.patch_size=8",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "crops.global_size=32", "crops.local_size=16",
        "head.hidden_dim=32", "head.bottleneck_dim=16", "eval.eval_size=32", "eval.resize_size=36"])
    model = SSLMetaArch(cfg)
    path = os.path.join(tmp_path, "checkpoint.pth")
    torch.save({"teacher": model.teacher.state_dict(), "student": model.student.state_dict(),
                "config": to_dict(cfg), "train_state": {"step": 3}}, path)
    out = os.path.join(tmp_path, "knn.json")
    code = cli_main(["eval", "knn", "--checkpoint", path, "--k", "5", "10", "--baselines", "--num-workers", "0",
                     "--batch-size", "16", "--device", "cpu", "--output", out])
    assert code == 0
    printed = capsys.readouterr().out
    assert "random_init" in printed and "raw_pixels" in printed
    with open(out) as fh:
        record = json.load(fh)
    assert record["checkpoint"]["step"] == 3 and record["ks"] == [5, 10]
    for name in ("trained", "random_init", "raw_pixels"):
        res = record["results"][name]
        assert res["n_train"] == 64 and res["n_test"] == 64
        assert set(res["knn"]) == {"5", "10"}
        assert 0.0 <= res["knn"]["5"]["top1"] <= res["knn"]["5"]["top5"] <= 100.0


def test_knn_cli_reports_missing_data_without_traceback(tmp_path, capsys):
    from flashdino.engine.cli import main as cli_main
    from flashdino.engine.config import build_config, to_dict
    from flashdino.engine.meta_arch import SSLMetaArch

    cfg = build_config(None, None, ["model.img_size=32", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                                    "crops.global_size=32", "crops.local_size=16", "head.hidden_dim=16",
                                    f"data.path={tmp_path}/nowhere"])
    path = os.path.join(tmp_path, "checkpoint.pth")
    torch.save({"teacher": SSLMetaArch(cfg).teacher.state_dict(), "config": to_dict(cfg)}, path)
    assert cli_main(["eval", "knn", "--checkpoint", path, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--train-data" in err and "Traceback" not in err


@pytest.mark.gpu
def test_gpu_search_equals_cpu():
    train, labels, test, test_labels = _random_problem(n_train=3000, n_test=500, dtype=torch.float64, noise=2.0)
    cpu = knn_accuracy(train, labels, test, test_labels, ks=(1, 20), query_chunk=128, train_chunk=1000)
    gpu = knn_accuracy(train, labels, test, test_labels, ks=(1, 20), query_chunk=128, train_chunk=1000,
                       device=torch.device("cuda"))
    assert gpu == cpu  # float64 on both: same neighbours, same votes

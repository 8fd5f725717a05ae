"""Weighted k-NN classification on frozen features (spec 5.1 / 5.2).

For each test feature f (L2-normalized) the `k` train features with the largest cosine similarity
vote for their class with weight exp(sim / T), T = 0.07; the prediction is the class with the
largest summed weight (top-5: the 5 largest).

Memory stays bounded at ImageNet scale: test features are processed in chunks of `query_chunk`,
and for each chunk the train features are scanned in chunks of `train_chunk`, keeping only a
running top-k, so the largest temporary is (query_chunk x train_chunk) whatever the train set's
size. Train features may live on the CPU (even memory-mapped) and are moved chunk by chunk.
Several k are answered from one search (the first k of the sorted top-max(k) neighbours).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

DEFAULT_KS = (20,)
KNN_TEMPERATURE = 0.07


def _check_inputs(train_features, train_labels, test_features, ks):
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"knn: features must be 2-D (N, D); got train {tuple(train_features.shape)}, "
                         f"test {tuple(test_features.shape)}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"knn: train features are {train_features.shape[1]}-d but test features are "
                         f"{test_features.shape[1]}-d")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"knn: train_labels has shape {tuple(train_labels.shape)}, expected ({train_features.shape[0]},)")
    if train_labels.numel() and int(train_labels.min()) < 0:
        raise ValueError("knn: train labels must be >= 0; the train set is unlabeled (label -1). "
                         "k-NN needs a labeled dataset (a class-folder tree, a labeled file list or Fashion-MNIST)")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"knn: every k must be >= 1, got {ks}")
    if ks[-1] > train_features.shape[0]:
        raise ValueError(f"knn: k = {ks[-1]} exceeds the {train_features.shape[0]} train features")
    return ks


@torch.no_grad()
def nearest_neighbors(train_features: torch.Tensor, test_features: torch.Tensor, k: int, *,
                      query_chunk: int = 1024, train_chunk: int = 65536,
                      device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` similarities (dot products) and train indices of every test row, sorted descending.

    Computed in the train features' dtype (float64 inputs give float64 results). Returns CPU tensors
    (Q, k) and (Q, k)."""
    if query_chunk < 1 or train_chunk < 1:
        raise ValueError(f"nearest_neighbors: chunk sizes must be >= 1, got {query_chunk}, {train_chunk}")
    n_train = train_features.shape[0]
    if not 1 <= k <= n_train:
        raise ValueError(f"nearest_neighbors: k = {k} must be in [1, {n_train}] (train set size)")
    device = torch.device(device) if device is not None else train_features.device
    dtype = train_features.dtype if train_features.dtype in (torch.float32, torch.float64) else torch.float32
    # Train chunks already on `device` are reused for every query chunk without a copy.
    resident = train_features.device == device and train_features.dtype == dtype
    out_sims = torch.empty(test_features.shape[0], k, dtype=dtype)
    out_idx = torch.empty(test_features.shape[0], k, dtype=torch.long)
    for q0 in range(0, test_features.shape[0], query_chunk):
        q = test_features[q0:q0 + query_chunk].to(device, dtype)
        best_s = best_i = None
        for t0 in range(0, n_train, train_chunk):
            t = train_features[t0:t0 + train_chunk]
            t = t if resident else t.to(device, dtype, non_blocking=True)
            sims = q @ t.T
            chunk_s, chunk_i = sims.topk(min(k, sims.shape[1]), dim=1)
            chunk_i += t0
            if best_s is None:
                best_s, best_i = chunk_s, chunk_i
            else:
                merged_s = torch.cat([best_s, chunk_s], dim=1)
                merged_i = torch.cat([best_i, chunk_i], dim=1)
                best_s, pos = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
                best_i = merged_i.gather(1, pos)
        out_sims[q0:q0 + len(q)] = best_s.cpu()
        out_idx[q0:q0 + len(q)] = best_i.cpu()
    return out_sims, out_idx


def vote(sims: torch.Tensor, neighbor_labels: torch.Tensor, num_classes: int,
         temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Class scores (Q, C): sum over the neighbours of exp(sim / T), per neighbour class.

    Each query's weights are scaled by exp(-max sim / T) (a positive constant per query, so the
    ranking is unchanged), which keeps exp() finite for un-normalized features."""
    if temperature <= 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    weights = ((sims - sims[:, :1]) / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype)
    return scores.scatter_add_(1, neighbor_labels, weights)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                ks: Iterable[int] = DEFAULT_KS, temperature: float = KNN_TEMPERATURE,
                num_classes: Optional[int] = None, normalize: bool = True, top: int = 5,
                **chunking) -> Dict[int, torch.Tensor]:
    """For each k: the `top` best classes of every test row, best first, (Q, min(top, C)).

    `normalize` L2-normalizes both feature sets first (a no-op for rows already unit-norm).
    `chunking`: ``query_chunk``, ``train_chunk``, ``device`` (see :func:`nearest_neighbors`)."""
    scored = knn_top_classes(train_features, train_labels, test_features, ks, temperature, num_classes, normalize,
                             top, **chunking)
    return {k: idx for k, (_, idx) in scored.items()}


def knn_top_classes(train_features, train_labels, test_features, ks=DEFAULT_KS, temperature=KNN_TEMPERATURE,
                    num_classes=None, normalize=True, top=5, **chunking) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Like :func:`knn_predict`, with the class scores: ``{k: (scores, classes)}``, each (Q, min(top, C))."""
    ks = _check_inputs(train_features, train_labels, test_features, ks)
    train_labels = train_labels.long().cpu()
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    if normalize:
        train_features = _normalized(train_features)
        test_features = _normalized(test_features)
    sims, idx = nearest_neighbors(train_features, test_features, ks[-1], **chunking)
    neighbor_labels = train_labels[idx]
    out = {}
    for k in ks:
        scores = vote(sims[:, :k], neighbor_labels[:, :k], num_classes, temperature)
        out[k] = scores.topk(min(top, num_classes), dim=1)
    return out


def _normalized(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return F.normalize(x, dim=1)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, ks: Iterable[int] = DEFAULT_KS, temperature: float = KNN_TEMPERATURE,
                 **kwargs) -> Dict[int, Dict[str, float]]:
    """``{k: {"top1": %, "top5": %}}``: micro-averaged accuracy in percent.

    A top-5 hit needs a positive score: a class no neighbour voted for is not a prediction (with
    fewer than 5 classes among the k neighbours, zero-score classes would otherwise fill the list in
    arbitrary order)."""
    if test_labels.shape != (test_features.shape[0],):
        raise ValueError(f"knn: test_labels has shape {tuple(test_labels.shape)}, expected ({test_features.shape[0]},)")
    if test_labels.numel() == 0:
        raise ValueError("knn: the test set is empty")
    if int(test_labels.min()) < 0:
        raise ValueError("knn: test labels must be >= 0; the test set is unlabeled (label -1)")
    num_classes = kwargs.pop("num_classes", None) or int(max(int(train_labels.max()), int(test_labels.max())) + 1)
    scored = knn_top_classes(train_features, train_labels, test_features, ks, temperature, num_classes=num_classes,
                             **kwargs)
    target = test_labels.long().cpu().unsqueeze(1)
    out = {}
    for k, (scores, top) in scored.items():
        hits = (top == target) & (scores > 0)
        out[k] = {"top1": 100.0 * hits[:, 0].double().mean().item(),
                  "top5": 100.0 * hits[:, :5].any(dim=1).double().mean().item()}
    return out


# ------------------------------------------------------------------------------------------
# whole evaluations: backbone features, raw pixels
# ------------------------------------------------------------------------------------------
def evaluate_knn(backbone: torch.nn.Module, train_reader, test_reader, transform, *, ks: Iterable[int] = DEFAULT_KS,
                 temperature: float = KNN_TEMPERATURE, batch_size: int = 256, num_workers: int = 0,
                 device: Optional[torch.device] = None, amp_dtype: Optional[torch.dtype] = None,
                 feature_dir: Optional[str] = None, query_chunk: int = 1024, train_chunk: int = 65536,
                 progress: bool = False) -> Dict[str, object]:
    """Weighted k-NN of `backbone`'s CLS features: train set = `train_reader`, queries = `test_reader`.

    Returns ``{"knn": {k: {"top1", "top5"}}, "n_train", "n_test", "dim", "failed_images",
    "extract_seconds", "knn_seconds"}``. `feature_dir` keeps the features as .npy memory maps."""
    import os
    import time

    from .features import cls_features, extract_features

    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    paths = {}
    if feature_dir:
        paths = {s: os.path.join(feature_dir, f"{s}_features.npy") for s in ("train", "test")}
    t0 = time.perf_counter()
    sets = {}
    for split, reader in (("train", train_reader), ("test", test_reader)):
        sets[split] = extract_features(backbone, reader, transform, batch_size=batch_size, num_workers=num_workers,
                                       device=device, feature_fn=cls_features, normalize=True, amp_dtype=amp_dtype,
                                       out_path=paths.get(split), progress=f"features {split}" if progress else None)
    t1 = time.perf_counter()
    train, test = sets["train"], sets["test"]
    # The search runs where the backbone ran. On a GPU the train features are copied there once when
    # they take at most half the free memory; otherwise they stream from the host chunk by chunk.
    bank = _on_device_if_it_fits(train.features, device)
    acc = knn_accuracy(bank, train.labels, test.features, test.labels, ks, temperature,
                       query_chunk=query_chunk, train_chunk=train_chunk, device=device)
    return {
        "knn": acc,
        "n_train": len(train),
        "n_test": len(test),
        "dim": int(train.features.shape[1]),
        "failed_images": len(train.failed_paths) + len(test.failed_paths),
        "extract_seconds": t1 - t0,
        "knn_seconds": time.perf_counter() - t1,
    }


def _on_device_if_it_fits(features: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return features
    free, _ = torch.cuda.mem_get_info(device)
    if features.numel() * features.element_size() > free // 2:
        return features
    return features.to(device)


def raw_pixel_knn(train_reader, test_reader, transform, *, ks: Iterable[int] = DEFAULT_KS,
                  temperature: float = KNN_TEMPERATURE, center: str = "image", max_dim: int = 65536,
                  **chunking) -> Dict[str, object]:
    """The raw-pixel baseline: the same weighted k-NN on flattened, per-image mean-centred pixels."""
    import time

    from .features import raw_pixel_features

    dim = 3 * transform.size * transform.size
    if dim > max_dim:
        raise ValueError(f"raw_pixel_knn: {transform.size}px images give {dim}-d pixel vectors (> {max_dim}); "
                         "this baseline is meant for small images (Fashion-MNIST)")
    t0 = time.perf_counter()
    train = raw_pixel_features(train_reader, transform, center=center)
    test = raw_pixel_features(test_reader, transform, center=center)
    acc = knn_accuracy(train.features, train.labels, test.features, test.labels, ks, temperature, **chunking)
    return {"knn": acc, "n_train": len(train), "n_test": len(test), "dim": int(train.features.shape[1]), "center": center,
            "seconds": time.perf_counter() - t0}

"""End-of-run pictures: loss-term curves, and the last layer's CLS attention maps (as DINO showed).

Figures are drawn with matplotlib's object API on an Agg canvas (no global backend switch, no
display needed). matplotlib is optional: without it the callers get a :class:`PlotsUnavailable`
error naming the install command.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence

import numpy as np
import torch


class PlotsUnavailable(ImportError):
    pass


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlotsUnavailable(f"plots need matplotlib ({exc}); install it with `pip install matplotlib`") from exc
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------
# loss curves
# ------------------------------------------------------------------------------------------
def curve_keys(records: Sequence[Dict[str, object]]) -> List[str]:
    """The loss terms present (total first), then the learning rate and the collapse diagnostics."""
    seen: Dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                seen.setdefault(k, None)
    losses = [k for k in seen if k.endswith("_loss")]
    losses.sort(key=lambda k: (k != "total_loss", k))
    extra = [k for k in ("lr", "collapse/effective_rank", "collapse/std_ratio") if k in seen]
    return losses + extra


def plot_loss_curves(records: Sequence[Dict[str, object]], path: str, title: str = "") -> str:
    """One panel per loss term (and LR, collapse diagnostics when logged) against the step."""
    keys = curve_keys(records)
    if not any(k.endswith("_loss") for k in keys):
        raise ValueError("plot_loss_curves: the metrics hold no loss term to plot")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(4.2 * cols, 2.8 * rows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = [(r["step"], r[key]) for r in records if key in r and "step" in r and _finite(r[key])]
        if pts:
            steps, values = zip(*sorted(pts))
            ax.plot(steps, values, lw=1.2, marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_knn_curve(record: Dict[str, object], path: str) -> str:
    """k-NN top-1 of the teacher against the step (``flashdino eval curve``), baselines as lines."""
    points = record["points"]
    if not points:
        raise ValueError("plot_knn_curve: no points")
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p["step"] for p in points], [p["top1"] for p in points], marker="o", lw=1.5, label="teacher")
    labels = {"random_init": "random init", "raw_pixels": "raw pixels"}
    for i, (name, top1) in enumerate(sorted(record.get("baselines", {}).items())):
        ax.axhline(top1, ls="--", lw=1.0, color=f"C{i + 1}", label=f"{labels.get(name, name)} ({top1:.2f}%)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"weighted {record['k']}-NN top-1 (%)")
    ax.set_title(str(record.get("data", "")), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ------------------------------------------------------------------------------------------
# attention maps
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def cls_attention(backbone, images: torch.Tensor) -> torch.Tensor:
    """Last-layer attention of the CLS token to each patch: (N, heads, h, w), rows summing to <= 1."""
    attn = backbone.get_last_selfattention(images)  # (N, heads, T, T)
    n, heads = attn.shape[:2]
    h = images.shape[2] // backbone.patch_size
    w = images.shape[3] // backbone.patch_size
    prefix = getattr(backbone, "num_prefix_tokens", 1)
    return attn[:, :, 0, prefix:].reshape(n, heads, h, w)


def plot_attention_maps(backbone, images: torch.Tensor, path: str, mean: Sequence[float], std: Sequence[float],
                        max_heads: int = 6, title: str = "") -> str:
    """Per image: the image, the head-averaged CLS attention over it, and up to `max_heads` heads."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"plot_attention_maps: expected a (N, C, H, W) batch, got {tuple(images.shape)}")
    was_training = backbone.training
    backbone.eval()
    try:
        from flashdino.engine.eval.backbone import prepared_for_eval

        with prepared_for_eval(backbone, None):  # fp32 images, eager blocks
            maps = cls_attention(backbone, images.to(next(backbone.parameters()).device)).float().cpu()
    finally:
        backbone.train(was_training)
    n, heads = maps.shape[:2]
    shown = min(heads, max_heads)
    pictures = _denormalize(images.cpu(), mean, std)
    cols = 2 + shown
    fig = _figure(1.6 * cols, 1.6 * n + (0.4 if title else 0))
    size = images.shape[-2:]
    up = torch.nn.functional.interpolate(maps, size=size, mode="nearest")  # patch grid -> pixels, no smoothing
    for i in range(n):
        panels = [(pictures[i], "image", None), (up[i].mean(0).numpy(), "mean of heads", "inferno")]
        panels += [(up[i, j].numpy(), f"head {j}", "inferno") for j in range(shown)]
        for c, (data, label, cmap) in enumerate(panels):
            ax = fig.add_subplot(n, cols, i * cols + c + 1)
            ax.imshow(data, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.float() * s + m).clamp(0, 1)
    return x.permute(0, 2, 3, 1).numpy()


def pick_images(reader, n: int = 6, seed: int = 0) -> List[int]:
    """Indices of `n` images: one per class first (labeled sets), else spread evenly."""
    labels = getattr(reader, "labels", None)
    total = len(reader)
    picked: List[int] = []
    if labels is not None and len(labels) == total and min(labels[: min(total, 2000)]) >= 0:
        first: Dict[int, int] = {}
        for i, label in enumerate(labels[: min(total, 20000)]):
            first.setdefault(int(label), i)
            if len(first) >= n:
                break
        picked = [first[c] for c in sorted(first)][:n]
    if len(picked) < n:
        rng = np.random.default_rng(seed)
        extra = [int(i) for i in rng.permutation(total)[: n * 2] if int(i) not in picked]
        picked += extra[: n - len(picked)]
    return picked[:n]


def load_images(reader, indices: Sequence[int], transform) -> torch.Tensor:
    """The images at `indices` through an :class:`~flashdino.engine.eval.features.EvalTransform`."""
    return torch.stack([transform(reader.load(int(i))[0]) for i in indices])

"""Linear probes on frozen features (spec 5.3 / 5.4), many trained at once.

Every probe is one ``Linear(in_dim -> classes)`` (weight ~ N(0, 0.01^2), bias 0) on a slice of the
same feature vector, trained with SGD (momentum 0.9, no weight decay by default) and cross-entropy
under its own cosine schedule to 0. One probe per (number of last blocks, avgpool, learning rate):
the backbone runs once per image for all of them (DINOv2's sweep, spec 5.4), and the v1 protocol
(spec 5.3) is the special case of one probe.

Feature layout (see :func:`flashdino.engine.eval.features.multi_block_features`): the CLS tokens of
the last ``n_max`` blocks in block order, then (when extracted) the mean patch token of the last
block, each D wide. A probe on the last n blocks reads columns [(n_max - n) D, n_max D) and, with
avgpool, the last D columns as well.

Train features come either from a cache (extracted once, center crop: fast) or are recomputed
for every batch from augmented images (random resized crop + flip: the reference protocols).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import prepared_for_eval
from .features import EvalImages, compute_features

# DINOv2's learning-rate sweep (spec 5.4); each is multiplied by batch_size / 256.
V2_LRS = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
SCHEDULES = ("iter", "epoch")


@dataclass(frozen=True)
class ProbeSpec:
    n_blocks: int  # CLS tokens of this many last blocks
    avgpool: bool  # plus the mean patch token of the last block
    lr: float  # base learning rate (before batch_size / 256 scaling)

    @property
    def name(self) -> str:
        return f"blocks{self.n_blocks}{'_avgpool' if self.avgpool else ''}_lr{self.lr:g}"


def probe_specs(n_blocks: Iterable[int], avgpool: Iterable[bool], lrs: Iterable[float]) -> List[ProbeSpec]:
    specs = [ProbeSpec(int(n), bool(a), float(lr)) for n in n_blocks for a in avgpool for lr in lrs]
    if not specs:
        raise ValueError("linear probe: need at least one (n_blocks, avgpool, lr) combination")
    for s in specs:
        if s.n_blocks < 1 or s.lr <= 0:
            raise ValueError(f"linear probe: n_blocks must be >= 1 and lr > 0, got {s}")
    return specs


def feature_columns(spec: ProbeSpec, dim: int, n_max: int, has_avgpool: bool) -> torch.Tensor:
    """Column indices of the feature vector that probe `spec` reads."""
    if spec.n_blocks > n_max:
        raise ValueError(f"probe {spec.name} needs {spec.n_blocks} blocks but only {n_max} were extracted")
    if spec.avgpool and not has_avgpool:
        raise ValueError(f"probe {spec.name} needs the avgpool features, which were not extracted")
    cols = list(range((n_max - spec.n_blocks) * dim, n_max * dim))
    if spec.avgpool:
        cols += list(range(n_max * dim, (n_max + 1) * dim))
    return torch.tensor(cols, dtype=torch.long)


class LinearProbes(nn.Module):
    """All probes; ``forward(features) -> list of logits`` (one tensor per probe)."""

    def __init__(self, specs: Sequence[ProbeSpec], dim: int, n_max: int, has_avgpool: bool, num_classes: int):
        super().__init__()
        self.specs = list(specs)
        self.heads = nn.ModuleList()
        for i, spec in enumerate(self.specs):
            cols = feature_columns(spec, dim, n_max, has_avgpool)
            self.register_buffer(f"cols{i}", cols, persistent=False)
            head = nn.Linear(len(cols), num_classes)
            nn.init.normal_(head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(head.bias)
            self.heads.append(head)

    def forward(self, features: torch.Tensor) -> List[torch.Tensor]:
        n_max_cols = features.shape[1]
        out = []
        for i, head in enumerate(self.heads):
            cols = getattr(self, f"cols{i}")
            x = features if cols.numel() == n_max_cols else features.index_select(1, cols)
            out.append(head(x))
        return out


def cosine_lr(base: float, progress: float) -> float:
    """Cosine annealing from `base` (progress 0) to 0 (progress 1)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclass
class ProbeResult:
    specs: List[ProbeSpec]
    final: List[Dict[str, float]]  # per probe: top1/top5 (%) on val after the last epoch
    history: List[Tuple[int, List[float]]] = field(default_factory=list)  # (epoch, top1 per probe) per evaluation

    @property
    def best_index(self) -> int:
        """The probe with the best final top-1 (DINOv2: best classifier after training)."""
        return max(range(len(self.final)), key=lambda i: self.final[i]["top1"])

    @property
    def best(self) -> Dict[str, object]:
        i = self.best_index
        return {"probe": self.specs[i].name, **self.final[i]}

    @property
    def best_over_epochs(self) -> Dict[str, object]:
        """Best top-1 of any probe at any evaluation (the v1 script's reported number)."""
        epoch, i, top1 = max(((e, i, t) for e, accs in self.history for i, t in enumerate(accs)), key=lambda r: r[2])
        return {"probe": self.specs[i].name, "epoch": epoch, "top1": top1}

    def to_dict(self) -> Dict[str, object]:
        return {
            "best": self.best,
            "best_over_epochs": self.best_over_epochs if self.history else None,
            "probes": [{"probe": s.name, "n_blocks": s.n_blocks, "avgpool": s.avgpool, "lr": s.lr, **f}
                       for s, f in zip(self.specs, self.final)],
            "history": [{"epoch": e, "top1": accs} for e, accs in self.history],
        }


def cached_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> Callable[[int], Iterator]:
    """Per-epoch shuffled batches of cached features; the order depends only on (seed, epoch)."""

    def epoch_batches(epoch: int):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(features.shape[0], generator=g)
        for start in range(0, len(perm), batch_size):
            idx = perm[start:start + batch_size]
            yield features[idx], labels[idx]

    return epoch_batches


@torch.no_grad()
def evaluate_probes(probes: LinearProbes, features: torch.Tensor, labels: torch.Tensor, device: torch.device,
                    batch_size: int = 4096) -> List[Dict[str, float]]:
    probes.eval()
    n = features.shape[0]
    hits1 = torch.zeros(len(probes.heads), dtype=torch.long)
    hits5 = torch.zeros(len(probes.heads), dtype=torch.long)
    for start in range(0, n, batch_size):
        x = features[start:start + batch_size].to(device, torch.float32)
        y = labels[start:start + batch_size].to(device)
        for i, logits in enumerate(probes(x)):
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits1[i] += int((top[:, 0] == y).sum())
            hits5[i] += int((top == y[:, None]).any(dim=1).sum())
    probes.train()
    return [{"top1": 100.0 * int(a) / n, "top5": 100.0 * int(b) / n} for a, b in zip(hits1, hits5)]


def train_linear_probes(
    epoch_batches: Callable[[int], Iterator[Tuple[torch.Tensor, torch.Tensor]]],
    iters_per_epoch: int,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    specs: Sequence[ProbeSpec],
    dim: int,
    n_max: int,
    has_avgpool: bool,
    num_classes: int,
    epochs: int,
    batch_size: int,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "iter",
    eval_every: int = 1,
    device: Optional[torch.device] = None,
    seed: int = 0,
    log: Optional[Callable[[str], None]] = None,
) -> ProbeResult:
    """Train every probe in `specs` on the batches `epoch_batches(epoch)` gives, evaluate on val.

    Learning rate of probe s: ``s.lr * batch_size / 256``, cosine-annealed to 0 per iteration
    (``schedule="iter"``, spec 5.4) or per epoch (``"epoch"``, spec 5.3). Evaluated every
    `eval_every` epochs and after the last."""
    if schedule not in SCHEDULES:
        raise ValueError(f"linear probe: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if epochs < 1 or iters_per_epoch < 1 or batch_size < 1:
        raise ValueError(f"linear probe: epochs, iters_per_epoch and batch_size must be >= 1, got "
                         f"{epochs}, {iters_per_epoch}, {batch_size}")
    if num_classes < 2:
        raise ValueError(f"linear probe: need at least 2 classes, got {num_classes}")
    device = torch.device(device or "cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probes = LinearProbes(specs, dim, n_max, has_avgpool, num_classes).to(device)
    scale = batch_size / 256.0
    base_lrs = [s.lr * scale for s in specs]
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": lr} for head, lr in zip(probes.heads, base_lrs)],
        lr=base_lrs[0], momentum=momentum, weight_decay=weight_decay,
    )
    total = epochs * iters_per_epoch
    result = ProbeResult(list(specs), [])
    it = 0
    for epoch in range(epochs):
        for x, y in epoch_batches(epoch):
            progress = it / total if schedule == "iter" else epoch / epochs
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = cosine_lr(lr, progress)
            x, y = x.to(device, torch.float32), y.to(device)
            # Probes have disjoint parameters, so one backward of the summed losses trains each on its own loss.
            loss = sum(F.cross_entropy(logits, y) for logits in probes(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            it += 1
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            accs = evaluate_probes(probes, val_features, val_labels, device)
            result.history.append((epoch + 1, [a["top1"] for a in accs]))
            result.final = accs
            if log:
                best = max(range(len(accs)), key=lambda i: accs[i]["top1"])
                log(f"[linear] epoch {epoch + 1}/{epochs}: best probe {specs[best].name} top-1 {accs[best]['top1']:.2f}%")
    result.probes = probes  # type: ignore[attr-defined]
    return result


def iters_for(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))


# ------------------------------------------------------------------------------------------
# augmented train features (the reference protocols)
# ------------------------------------------------------------------------------------------
class ProbeTrainTransform:
    """RandomResizedCrop(size, scale (0.08, 1)) + horizontal flip + ToTensor + Normalize, drawn from
    an explicit generator (so a (seed, epoch, index) key fixes the view). Bilinear in the v1
    protocol (spec 5.3), bicubic in v2 (spec 5.4)."""

    def __init__(self, size: int, mean, std, interpolation: str = "bilinear", scale=(0.08, 1.0)):
        from .features import EvalTransform

        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"ProbeTrainTransform: interpolation must be bilinear or bicubic, got {interpolation!r}")
        self.size, self.interpolation, self.scale = int(size), interpolation, tuple(scale)
        self._normalize = EvalTransform(size, size, mean, std)

    def __call__(self, img, rng: np.random.Generator) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        from flashdino.pipelines.augment import ASPECT_RATIO, sample_crop_box

        img = img.convert("RGB") if img.mode != "RGB" else img
        top, left, h, w = sample_crop_box(img.width, img.height, self.scale, ASPECT_RATIO, rng)
        mode = InterpolationMode.BILINEAR if self.interpolation == "bilinear" else InterpolationMode.BICUBIC
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], mode, antialias=True)
        if rng.random() < 0.5:
            img = TF.hflip(img)
        return self._normalize.normalize_uint8(np.asarray(img)[None])[0]


class _AugmentedImages(EvalImages):
    """:class:`EvalImages` through the probe's random train transform, seeded per (seed, epoch, index)."""

    def __init__(self, reader, transform: ProbeTrainTransform, seed: int):
        super().__init__(reader, transform)
        self.seed, self.epoch = seed, 0

    def transformed(self, img, index: int) -> torch.Tensor:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
        return self.transform(img, rng)


def augmented_batches(backbone: nn.Module, reader, transform: ProbeTrainTransform, feature_fn, *, batch_size: int,
                      num_workers: int = 0, device: Optional[torch.device] = None, amp_dtype=None,
                      seed: int = 0) -> Callable[[int], Iterator]:
    """Per-epoch batches whose features the frozen `backbone` computes from fresh augmented views.

    Images that fail to decode are dropped from their batch (and counted in ``skipped``)."""
    dataset = _AugmentedImages(reader, transform, seed)
    device = torch.device(device or "cpu")
    state = {"skipped": 0}

    def epoch_batches(epoch: int):
        dataset.epoch = epoch
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch, 1])).permutation(len(reader)).tolist()
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers,
                                             pin_memory=device.type == "cuda", drop_last=False)
        backbone.eval()
        for images, labels, ok in loader:
            if not bool(ok.all()):
                state["skipped"] += int((~ok).sum())
                images, labels = images[ok], labels[ok]
                if len(labels) == 0:
                    continue
            with torch.no_grad(), prepared_for_eval(backbone, amp_dtype):
                images = images.to(device, non_blocking=True)
                feats = compute_features(feature_fn, backbone, images, amp_dtype)
            yield feats, labels.long()

    epoch_batches.state = state  # type: ignore[attr-defined]
    return epoch_batches

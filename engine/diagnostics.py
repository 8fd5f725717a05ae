"""Collapse diagnostics: is the teacher still producing diverse outputs?

A self-distillation run collapses when the teacher maps every image to (nearly) the same output:
the loss can keep improving while the representation is useless. Two numbers catch it early, on
the teacher's outputs of one batch, each row L2-normalized:

* effective rank (Roy & Vetterli 2007; RankMe): exp of the entropy of the normalized singular
  values of the (rows x dims) output matrix. 1 = every row the same direction; up to min(rows, dims).
* per-dimension std across the batch. Unit vectors spread evenly over the sphere in p dimensions
  have a std of 1/sqrt(p) per dimension, so ``std_ratio = mean std * sqrt(p)`` is about 1 for an
  isotropic spread and falls to 0 under collapse.

:class:`CollapseMonitor` computes them at every log step (the model keeps its last teacher output
in ``last_teacher_output``), logs them, and warns when they fall below thresholds.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

# Warn below these (after the first `warmup_logs` log steps, when a random-init teacher is still
# settling). Healthy runs stay far above both; a collapsed one drops to ~1 and ~0.
RANK_FRACTION_WARN = 0.02  # effective rank / min(rows, dims)
STD_RATIO_WARN = 0.1  # mean per-dim std * sqrt(dims)


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D matrix, via the eigenvalues of its smaller Gram matrix.

    The Gram matrix is formed in float64: in float32 its rounding noise (~1e-7 of the largest
    eigenvalue) would turn into spurious singular values of ~3e-4 and inflate the effective rank."""
    if x.ndim != 2:
        raise ValueError(f"singular_values: expected a 2-D matrix, got shape {tuple(x.shape)}")
    x = x.detach().double()
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    eig = torch.linalg.eigvalsh(gram.cpu())
    return eig.clamp(min=0).sqrt().flip(0)


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of s / sum(s)) of the singular values s; 0 for an all-zero matrix."""
    s = singular_values(x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def collapse_stats(outputs: torch.Tensor) -> Dict[str, float]:
    """Diagnostics of a (rows, dims) batch of outputs; rows are L2-normalized first."""
    if outputs.ndim != 2 or outputs.shape[0] < 2:
        raise ValueError(f"collapse_stats: need a (rows >= 2, dims) matrix, got shape {tuple(outputs.shape)}")
    z = F.normalize(outputs.detach().double(), dim=1)
    n, p = z.shape
    erank = effective_rank(z)
    std = z.std(dim=0)
    std_mean = float(std.mean())
    return {
        "collapse/effective_rank": erank,
        "collapse/rank_fraction": erank / min(n, p),
        "collapse/std_mean": std_mean,
        "collapse/std_ratio": std_mean * math.sqrt(p),
    }


def is_collapsing(stats: Dict[str, float], rank_fraction: float = RANK_FRACTION_WARN,
                  std_ratio: float = STD_RATIO_WARN) -> bool:
    return stats["collapse/rank_fraction"] < rank_fraction or stats["collapse/std_ratio"] < std_ratio


class CollapseMonitor:
    """Trainer callback: logs :func:`collapse_stats` of the teacher's last output at each log step
    and warns (once per episode, and again if it recovers and falls back) when it looks collapsed."""

    def __init__(self, rank_fraction: float = RANK_FRACTION_WARN, std_ratio: float = STD_RATIO_WARN,
                 warmup_logs: int = 1):
        self.rank_fraction, self.std_ratio, self.warmup_logs = rank_fraction, std_ratio, warmup_logs
        self.n_logs = 0
        self.n_warnings = 0
        self.collapsed = False
        self.last: Optional[Dict[str, float]] = None
        self.first_warning_step: Optional[int] = None

    def on_log(self, trainer, step: int, metrics: Dict[str, float], losses=None) -> None:
        from flashdino.engine.meta_arch import unwrap

        outputs = getattr(unwrap(trainer.model), "last_teacher_output", None)
        if outputs is None or outputs.ndim != 2 or outputs.shape[0] < 2:
            return
        self.n_logs += 1
        stats = collapse_stats(outputs)
        self.last = stats
        metrics.update(stats)  # logged with the step's other metrics (callbacks run before the logger)
        warn = self.n_logs > self.warmup_logs and is_collapsing(stats, self.rank_fraction, self.std_ratio)
        if warn and not self.collapsed:
            self.n_warnings += 1
            self.first_warning_step = self.first_warning_step or step
            trainer.logger.write(
                f"[flashdino] WARNING step {step}: the teacher's outputs look collapsed: effective rank "
                f"{stats['collapse/effective_rank']:.2f} ({100 * stats['collapse/rank_fraction']:.1f}% of the maximum), "
                f"per-dim std {stats['collapse/std_ratio']:.3f} x the isotropic value. Typical causes: learning rate "
                f"too high, teacher momentum too low, a weak expansion term (SimDINO: objective.eps too large or "
                f"objective.coeff too high) or centering off (DINO).")
        elif self.collapsed and not warn:
            trainer.logger.write(f"[flashdino] step {step}: the teacher's outputs recovered from the collapse warning "
                                 f"(effective rank {stats['collapse/effective_rank']:.2f})")
        self.collapsed = warn

    def summary(self) -> Dict[str, object]:
        return {"warnings": self.n_warnings, "first_warning_step": self.first_warning_step,
                "collapsed_at_end": self.collapsed, "last": self.last}

    def on_train_end(self, trainer, summary: Dict[str, object]) -> None:
        summary["collapse"] = self.summary()

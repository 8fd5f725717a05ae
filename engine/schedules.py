"""Per-iteration schedules for LR, weight decay, teacher momentum and teacher temperature (spec 1.4).

Two styles differ in their warmup (trap T10):
* v1 (SimDINO / DINO): warmup is ``linspace(start, peak, W)`` *including* the endpoint.
* v2 (SimDINOv2 / DINOv2): warmup is ``start + (peak - start) * i / W``, endpoint excluded.
The cosine part is the same: ``final + (peak - final) / 2 * (1 + cos(pi * (i - W) / (T - W)))``.
Schedules are evaluated on the fly from the global iteration, so a resumed run needs only the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    peak: float
    final: float
    total_iters: int
    warmup_iters: int = 0
    start: float = 0.0
    style: str = "v1"  # "v1" | "v2"
    freeze_iters: int = 0  # value 0 before this iteration (DINOv2 last-layer LR in epoch 0)

    def __post_init__(self):
        if self.style not in ("v1", "v2"):
            raise ValueError(f"schedule style must be 'v1' or 'v2', got {self.style!r}")
        if self.warmup_iters > self.total_iters:
            raise ValueError(f"warmup ({self.warmup_iters} iterations) is longer than the schedule ({self.total_iters})")

    def __call__(self, i: int) -> float:
        if i < self.freeze_iters:
            return 0.0
        w, t = self.warmup_iters, self.total_iters
        if i < w:
            if self.style == "v1":
                # np.linspace(start, peak, w): reaches peak on the last warmup iteration
                # (with w == 1 the single value is `start`, as np.linspace gives).
                return self.start + (self.peak - self.start) * (i / (w - 1) if w > 1 else 0.0)
            return self.start + (self.peak - self.start) * i / w
        if i >= t:
            return self.final
        return self.final + 0.5 * (self.peak - self.final) * (1 + math.cos(math.pi * (i - w) / (t - w)))


@dataclass(frozen=True)
class LinearWarmupConstant:
    """Linear ramp from `start` to `end` over `warmup_iters`, then `end` (v2 teacher temperature)."""

    start: float
    end: float
    warmup_iters: int

    def __call__(self, i: int) -> float:
        if i < self.warmup_iters:
            return self.start + (self.end - self.start) * i / self.warmup_iters
        return self.end


@dataclass(frozen=True)
class PerEpochLinear:
    """v1 teacher temperature: ``linspace(start, end, warmup_epochs)`` indexed by epoch, then `end`."""

    start: float
    end: float
    warmup_epochs: int
    iters_per_epoch: int

    def __call__(self, i: int) -> float:
        epoch = i // self.iters_per_epoch
        w = self.warmup_epochs
        if epoch < w:
            return self.start + (self.end - self.start) * (epoch / (w - 1) if w > 1 else 0.0)
        return self.end


def scaled_peak_lr(base_lr: float, rule: str, global_batch: int) -> float:
    """Peak LR from the base LR and the global batch N*B (spec 1.4)."""
    if rule == "linear_wrt_256":
        return base_lr * global_batch / 256.0
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown LR scaling rule {rule!r}; valid: linear_wrt_256, sqrt_wrt_1024, none")


@dataclass(frozen=True)
class TrainingSchedules:
    lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: object
    last_layer_lr: CosineSchedule
    total_iters: int
    iters_per_epoch: int

    def values(self, i: int) -> dict:
        return {
            "lr": self.lr(i),
            "wd": self.wd(i),
            "momentum": self.momentum(i),
            "teacher_temp": self.teacher_temp(i),
            "last_layer_lr": self.last_layer_lr(i),
        }


def build_schedules(cfg, iters_per_epoch: int, world_size: int) -> TrainingSchedules:
    """All schedules of a run from its config (spec 1.4 table)."""
    o, obj = cfg.optim, cfg.objective
    n = iters_per_epoch
    total = o.epochs * n
    warmup = o.warmup_epochs * n
    peak = scaled_peak_lr(o.base_lr, o.lr_scaling, cfg.data.batch_size * world_size)
    style = o.schedule_style
    lr_start = 0.0 if style == "v1" else o.min_lr
    lr = CosineSchedule(peak, o.min_lr, total, warmup, lr_start, style)
    wd = CosineSchedule(o.weight_decay, o.weight_decay_end, total, 0, 0.0, style)
    mom = CosineSchedule(cfg.teacher.momentum, cfg.teacher.momentum_end, total, 0, 0.0, style)
    freeze = obj.freeze_last_layer_epochs * n if obj.method == "dinov2" else 0
    last_layer_lr = CosineSchedule(peak, o.min_lr, total, warmup, lr_start, style, freeze)
    if style == "v1":
        temp = PerEpochLinear(obj.warmup_teacher_temp, obj.teacher_temp, obj.warmup_teacher_temp_epochs, n)
    else:
        temp = LinearWarmupConstant(obj.warmup_teacher_temp, obj.teacher_temp, obj.warmup_teacher_temp_epochs * n)
    return TrainingSchedules(lr, wd, mom, temp, last_layer_lr, total, n)

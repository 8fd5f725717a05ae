"""The plain runtime: one process, or DDP. A torch AdamW, a GradScaler for fp16 autocast, clipping
per the config (spec 1.6) and the teacher EMA over whole parameters.

Every runtime offers the same small interface, which is all :class:`~flashdino.engine.trainer.Trainer`
calls (see also :mod:`.deepspeed_backend`):

``module`` (what the forward is called on), ``optimizer`` (its param groups receive the schedule),
``prepare_batch``, ``autocast``, ``backward``, ``step``, ``ema_update``, ``state_dict``,
``load_state_dict``, ``save_shards``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional

import torch

from flashdino.engine.ema import build_ema, paired_parameters
from flashdino.engine.optim import build_optimizer, build_param_groups, clip_per_module, clip_per_parameter, drop_last_layer_grads

from .ddp import wrap_ddp

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def clip_gradients(cfg, student) -> Dict[str, torch.Tensor]:
    """Spec 1.6 clipping on whole gradients; returns the backbone's and the head's gradient norms
    before clipping (in either mode: they are what a user watches for instability)."""
    out: Dict[str, torch.Tensor] = {}
    o = cfg.optim
    if o.clip_grad > 0:
        if o.clip_mode == "per_param":  # each tensor on its own; the module norms from the tensors'
            norms = [clip_per_parameter(student[part].parameters(), o.clip_grad) for part in ("backbone", "head")]
            norms = [n.float().square().sum().sqrt() for n in norms]
        else:
            norms = [n.detach() for n in clip_per_module([student["backbone"], student["head"]], o.clip_grad)]
        out["grad_norm_backbone"], out["grad_norm_head"] = norms
    return out


def _build_fused_adamw_ema(cfg, param_groups, model):
    from flashdino.kernels import FusedAdamWEMA

    teacher, student = paired_parameters(model.teacher, model.student)
    teacher_of = {s: t for s, t in zip(student, teacher)}
    o = cfg.optim
    return FusedAdamWEMA(param_groups, teacher_of, lr=0.0, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=0.0,
                         kind="triton")


class LocalRuntime:
    """Single process (``name`` "local") or DistributedDataParallel (``name`` "ddp")."""

    def __init__(self, cfg, model, device: torch.device, distributed: bool = False):
        self.cfg, self.model, self.device = cfg, model, device
        self.name = "ddp" if distributed else "local"
        student = model.student
        self.param_groups = build_param_groups(cfg, student["backbone"], student["head"])
        # runtime.kernels.optimizer=fused_adamw_ema: one Triton pass does AdamW and the teacher EMA,
        # so the EMA happens inside the optimizer step (ema_update) instead of after it.
        self.fused_adamw_ema = cfg.runtime.kernels.optimizer == "fused_adamw_ema"
        if self.fused_adamw_ema:
            self.optimizer = _build_fused_adamw_ema(cfg, self.param_groups, model)
            self.ema = None
        else:
            self.optimizer = build_optimizer(cfg, self.param_groups)
            self.ema = build_ema(cfg.runtime.kernels.ema, model.teacher, model.student)
        self.amp_dtype = AUTOCAST_DTYPES.get(cfg.train.precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
        self.module = wrap_ddp(model) if distributed else model

    # ---------------------------------------------------------------------------------- step
    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return batch

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step(self, freeze_last_layer: bool = False) -> Dict[str, torch.Tensor]:
        """Unscale, clip, optionally drop the prototype layer's gradients (DINO), step."""
        self.scaler.unscale_(self.optimizer)
        norms = clip_gradients(self.cfg, self.model.student)
        if freeze_last_layer:
            drop_last_layer_grads(self.model.student)
        if not self.fused_adamw_ema:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return norms

    def ema_update(self, momentum: float) -> None:
        if self.fused_adamw_ema:
            # AdamW + EMA in one pass. A step the GradScaler skips (inf gradients) still moves the
            # teacher towards the unchanged student, as the eager path's separate EMA does.
            taken = self.optimizer.steps_taken
            self.scaler.step(self.optimizer, momentum)
            self.scaler.update()
            if self.optimizer.steps_taken == taken:
                self.optimizer.ema_step(momentum)
        else:
            self.ema.update(momentum)

    def eval_teacher_backbone(self) -> torch.nn.Module:
        """The teacher backbone for evaluation and plots: the model's own (fp32 weights, whole)."""
        return self.model.teacher["backbone"]

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        model = self.model
        return {
            "student": model.student.state_dict(),
            "teacher": model.teacher.state_dict(),
            "buffers": {k: v for k, v in model.named_buffers() if not k.startswith(("student.", "teacher."))},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any], output_dir: Optional[str] = None) -> None:
        model = self.model
        model.student.load_state_dict(state["student"])
        model.teacher.load_state_dict(state["teacher"])
        for name, value in state.get("buffers", {}).items():
            getattr(model, name).copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        # A checkpoint written without fp16 has an empty scaler state (GradScaler refuses to load
        # one); resuming it in fp16 starts the loss scale afresh, as a new fp16 run would.
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_shards(self, output_dir: str, step: int) -> Optional[Dict[str, Any]]:
        """Per-rank files a checkpoint needs besides checkpoint.pth: none here."""
        return None

    def prune_shards(self, output_dir: str) -> None:
        return None

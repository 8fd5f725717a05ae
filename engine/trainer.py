"""The training loop. Read `Trainer.train_step` first: it is the whole algorithm (spec 2.6, 3.7).

Exact resume: everything a step depends on is either saved in the checkpoint (weights, teacher,
optimizer and scaler state, DINO centers, RNG states, step, epoch and position in the epoch) or is
a pure function of (seed, epoch, index) (data order, crops, masks), so 3 steps + resume + 3 steps
equal 6 steps straight, bit for bit.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Config, dump_yaml, to_dict
from .distributed import barrier, get_rank, get_world_size, init_from_env, is_main_process
from .ema import build_ema
from .finite_guard import FiniteGuard
from .meta_arch import SSLMetaArch, unwrap
from .metrics import MetricsLogger
from .optim import apply_schedule, build_optimizer, build_param_groups, clip_per_module, clip_per_parameter, drop_last_layer_grads
from .schedules import build_schedules
from flashdino.profiling.ranges import phase


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return device


_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (= index of the next iteration)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    images_seen: int = 0
    skipped_files: List[str] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, callbacks: Optional[List[Any]] = None):
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        init_from_env()
        self.rank, self.world_size = get_rank(), get_world_size()
        self.device = resolve_device(cfg.train.device)
        self._seed_everything(cfg.train.seed + self.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.model = SSLMetaArch(cfg).to(self.device)
        self.model.train()
        student = self.model.student
        self.param_groups = build_param_groups(cfg, student["backbone"], student["head"])
        self.optimizer = build_optimizer(cfg, self.param_groups)
        self.ema = build_ema(cfg.runtime.kernels.ema, self.model.teacher, self.model.student)
        self.amp_dtype = _AUTOCAST_DTYPES.get(cfg.train.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.ddp_model = self._wrap_distributed(self.model)

        self.loader = self.sampler = self.dataset = None
        self.state = TrainState()
        self._build_data(epoch=0, start_batch=0)
        iters = cfg.optim.iters_per_epoch or self.sampler.batches_per_epoch
        if iters > self.sampler.batches_per_epoch:
            raise ValueError(
                f"optim.iters_per_epoch={iters} exceeds the {self.sampler.batches_per_epoch} batches an epoch of "
                f"this dataset holds at data.batch_size={cfg.data.batch_size} x {self.world_size} ranks"
            )
        if iters < 1:
            raise ValueError(
                f"the dataset has {len(self.dataset)} images: fewer than one batch of {cfg.data.batch_size} x "
                f"{self.world_size} ranks. Lower data.batch_size or add images."
            )
        self.schedules = build_schedules(cfg, iters, self.world_size)
        self.guard = FiniteGuard()
        self.output_dir = cfg.train.output_dir
        if cfg.train.resume:
            self._maybe_resume()
        self.total_steps = self.schedules.total_iters
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.logger = MetricsLogger(
            self.output_dir, self.total_steps, self.state.step, cfg.log.jsonl, cfg.log.tensorboard,
            cfg.log.progress_bar, enabled=is_main_process(),
        )

    # ------------------------------------------------------------------------------------------
    # set-up helpers
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _wrap_distributed(self, model):
        if self.world_size == 1 or self.cfg.runtime.distributed in ("none",):
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Centers are all-reduced inside the loss, so every rank holds the same buffers already.
        return DDP(model, device_ids=ids, broadcast_buffers=False)

    def _build_data(self, epoch: int, start_batch: int) -> None:
        cfg = self.cfg
        if cfg.data.pipeline == "dali":
            from flashdino.pipelines.dali import build_dali_loader

            device_id = self.device.index if self.device.type == "cuda" else None
            self.loader, self.sampler, self.dataset = build_dali_loader(
                cfg, self.rank, self.world_size, epoch=epoch, start_batch=start_batch, device_id=device_id
            )
        else:
            from flashdino.pipelines.loader import build_train_loader

            self.loader, self.sampler, self.dataset = build_train_loader(
                cfg, self.rank, self.world_size, epoch=epoch, start_batch=start_batch
            )

    def _set_epoch(self, epoch: int, start_batch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch, start_batch)
            return
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_batch(start_batch)
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(epoch)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        model = unwrap(self.model)
        return {
            "student": model.student.state_dict(),
            "teacher": model.teacher.state_dict(),
            "buffers": {k: v for k, v in model.named_buffers() if not k.startswith(("student.", "teacher."))},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": vars(self.state).copy(),
            "rng": ckpt.rng_state(),
            "config": to_dict(self.cfg),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        model = unwrap(self.model)
        model.student.load_state_dict(state["student"])
        model.teacher.load_state_dict(state["teacher"])
        for name, value in state.get("buffers", {}).items():
            getattr(model, name).copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["train_state"])
        ckpt.set_rng_state(state["rng"])

    def _maybe_resume(self) -> None:
        if is_main_process() and os.path.isdir(self.output_dir):
            ckpt.remove_stale_temp_files(self.output_dir)
        path = ckpt.find_latest(self.output_dir)
        if path is None:
            return
        state = ckpt.load_checkpoint(path, map_location=self.device)
        saved_ws = state.get("world_size", 1)
        if saved_ws != self.world_size:
            raise ckpt.CheckpointError(
                f"checkpoint '{path}' was written with world size {saved_ws}, this run has {self.world_size}; "
                f"the schedules and data order would not continue exactly. Start a new output_dir."
            )
        self.load_state_dict(state)
        print(f"[flashdino] resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
              f"batch {self.state.batch_in_epoch})", file=sys.stderr)

    def save_checkpoint(self) -> Optional[str]:
        self.guard.check()  # never write weights produced by a non-finite step
        path = None
        if is_main_process():
            path = ckpt.save_checkpoint(self.output_dir, self.state_dict(), self.state.step, self.cfg.train.keep_checkpoints)
        barrier()
        return path

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------
    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        cfg, i = self.cfg, self.state.step
        sched = self.schedules.values(i)
        apply_schedule(self.optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
        with phase("h2d"):
            batch = self._to_device(batch)

        # teacher forward, student forward and the loss (phases marked inside the model)
        with self._autocast():
            losses = self.ddp_model(batch, teacher_temp=sched["teacher_temp"])
        self.guard.record(i, losses)

        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["total_loss"]).backward()
        with phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            student = self.model.student
            if cfg.optim.clip_grad > 0:
                if cfg.optim.clip_mode == "per_param":
                    clip_per_parameter(student.parameters(), cfg.optim.clip_grad)
                else:
                    norms = clip_per_module([student["backbone"], student["head"]], cfg.optim.clip_grad)
                    losses["grad_norm_backbone"], losses["grad_norm_head"] = norms[0].detach(), norms[1].detach()
            if cfg.objective.method == "dino" and self.state.epoch < cfg.objective.freeze_last_layer_epochs:
                drop_last_layer_grads(student)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with phase("ema"):
            self.ema.update(sched["momentum"])

        losses.update({k: torch.tensor(v) for k, v in sched.items()})
        return losses

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        cfg, st = self.cfg, self.state
        if is_main_process():
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as fh:
                fh.write(dump_yaml(cfg))
        n = self.schedules.iters_per_epoch
        log_every = max(1, cfg.train.log_every)
        window_start, window_images = time.perf_counter(), 0
        last: Dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            while st.step < self.total_steps:
                self._set_epoch(st.epoch, st.batch_in_epoch)
                batches = iter(self.loader)
                while st.step < self.total_steps and st.batch_in_epoch < n:
                    with phase("data_wait"):
                        batch = next(batches, None)
                    if batch is None:
                        break
                    self._count_skipped(batch)
                    losses = self.train_step(batch)
                    st.step += 1
                    st.batch_in_epoch += 1
                    images = batch["global_crops"].shape[0] // 2
                    st.images_seen += images * self.world_size
                    window_images += images * self.world_size
                    self.logger.advance()
                    if self.device.type == "cpu":
                        self.guard.check()
                    if st.step % log_every == 0 or st.step == self.total_steps:
                        self.guard.check()
                        elapsed = time.perf_counter() - window_start
                        last = {k: float(v.detach()) for k, v in losses.items() if torch.is_tensor(v) and v.ndim == 0}
                        last.update({"epoch": st.epoch, "img/s": window_images / max(elapsed, 1e-9),
                                     "skipped_images": len(st.skipped_files)})
                        self.logger.log(st.step, last)
                        for cb in self.callbacks:
                            if hasattr(cb, "on_log"):
                                cb.on_log(self, st.step, last, losses)
                        window_start, window_images = time.perf_counter(), 0
                    if cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0:
                        self.save_checkpoint()
                if st.batch_in_epoch >= n:
                    st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                    self.save_checkpoint()
            self.guard.check()
            self.save_checkpoint()
        finally:
            self.logger.close()
        summary = {
            "steps": st.step,
            "epochs": st.epoch + st.batch_in_epoch / n,
            "images_seen": st.images_seen,
            "train_seconds": time.perf_counter() - t_start,
            "skipped_images": len(st.skipped_files),
            "last_metrics": last,
            "output_dir": self.output_dir,
        }
        if st.skipped_files and is_main_process():
            print(f"[flashdino] skipped {len(st.skipped_files)} unreadable image file(s); first: "
                  f"{', '.join(st.skipped_files[:5])}", file=sys.stderr)
        for cb in self.callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self, summary)
        return summary

    def _count_skipped(self, batch: Dict[str, Any]) -> None:
        for path in batch.get("skipped") or []:
            if path not in self.state.skipped_files:
                self.state.skipped_files.append(path)
                self.logger.write(f"[flashdino] skipped unreadable image: {path} "
                                  f"({len(self.state.skipped_files)} so far)")


def train(cfg: Config, callbacks: Optional[List[Callable]] = None) -> Dict[str, Any]:
    return Trainer(cfg, callbacks).fit()

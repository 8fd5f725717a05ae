"""The training loop. Read `Trainer.train_step` first: it is the whole algorithm (spec 2.6, 3.7).

How the step runs is the runtime's business (``engine/runtime``): plain, DDP or DeepSpeed ZeRO-1/2/3
for the optimizer, gradients and the teacher EMA, and torch.compile for the forward; the loop below
reads the same whichever is used.

Exact resume: everything a step depends on is either saved in the checkpoint (weights, teacher,
optimizer and scaler state or the DeepSpeed shards it names, DINO centers, every rank's RNG state,
step, epoch and position in the epoch) or is a pure function of (seed, epoch, index) (data order,
crops, masks), so 3 steps + resume + 3 steps equal 6 steps straight, bit for bit.

Stopping: at the end of the schedule, at train.max_minutes, or after a stop signal (SIGTERM, SIGINT,
SIGUSR1; engine/stop_signals.py), always with a checkpoint, on every rank at the same step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import checkpoint as ckpt
from . import run_lock
from .config import Config, ConfigError, dump_yaml, to_dict
from .data_wait import DataWaitMonitor
from .distributed import (barrier, get_rank, get_world_size, host_group, init_from_env, is_distributed,
                          is_main_process, max_over_ranks, mean_over_ranks, rank0_values)
from .finite_guard import FiniteGuard
from .memory_advice import TrainingOutOfMemoryError, out_of_memory_advice
from .meta_arch import SSLMetaArch
from .metrics import MetricsLogger
from .optim import apply_schedule
from .resume_check import changed_settings_warning, check_checkpoint_fits
from .runtime import build_runtime
from .runtime.attention_check import check_model_attention
from .runtime.compile import CompileMonitor, apply_compile, mark_variable_lengths
from .runtime.auto import resolve_auto
from .schedules import build_schedules
from .stop_signals import StopSignals
from . import time_budget
from flashdino.profiling.ranges import phase


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return device


_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# torch.compile backend; "aot_eager" traces and checks graphs without inductor's code generation
# (tests, debugging a graph break). Not a config key: it changes how, not what, the step computes.
COMPILE_BACKEND_ENV = "FLASHDINO_COMPILE_BACKEND"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (= index of the next iteration)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    images_seen: int = 0
    skipped_files: List[str] = field(default_factory=list)


def dali_device_id(device: torch.device) -> Optional[int]:
    """DALI's device_id for the training device: None runs DALI on the CPU; a bare "cuda" (train.device=cuda)
    means the current device, not the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


class Trainer:
    def __init__(self, cfg: Config, callbacks: Optional[List[Any]] = None):
        if cfg.train.max_minutes < 0:  # before anything is built
            raise ConfigError(f"train.max_minutes must be >= 0 (0: no limit), got {cfg.train.max_minutes}")
        self.callbacks = list(callbacks or [])
        init_from_env()
        self.rank, self.world_size = get_rank(), get_world_size()
        # where the ranks agree on a stop signal every step (a new gloo group under NCCL: only if used)
        self._host_group = host_group() if cfg.train.handle_signals else None
        self.device = resolve_device(cfg.train.device)
        self.cfg = cfg = resolve_auto(cfg, self.device)
        if is_main_process():  # one run per output folder (before the costly set-up a second run would waste)
            weakref.finalize(self, run_lock.release, run_lock.acquire(cfg.train.output_dir))
        self._seed_everything(cfg.train.seed + self.rank)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.model = SSLMetaArch(cfg).to(self.device)
        self.model.train()
        self.attention_report = self._check_attention()
        # The runtime (plain, DDP or DeepSpeed ZeRO) owns the optimizer, the EMA and gradient handling.
        self.runtime = build_runtime(cfg, self.model, self.device, self.world_size)
        self.optimizer = self.runtime.optimizer
        self.forward = apply_compile(self.model, self.runtime.module, cfg.runtime.compile, self.device,
                                     backend=os.environ.get(COMPILE_BACKEND_ENV, cfg.runtime.compile_backend),
                                     cuda_graphs=cfg.runtime.cuda_graphs, method=cfg.objective.method)
        self.compile_monitor = CompileMonitor() if cfg.runtime.compile != "none" else None
        self.compile_report = None  # CompileStats of the warm-up step, once it ran
        self._eval_teacher = None  # (step, teacher backbone for evaluation), see teacher_backbone_for_eval
        self.recompiles_after_warmup = 0

        self.loader = self.sampler = self.dataset = None
        self.state = TrainState()
        self._build_data(epoch=0, start_batch=0)
        iters = cfg.optim.iters_per_epoch or self.sampler.batches_per_epoch
        if iters > self.sampler.batches_per_epoch:
            raise ConfigError(
                f"optim.iters_per_epoch={iters} exceeds the {self.sampler.batches_per_epoch} batches an epoch of "
                f"this dataset holds at data.batch_size={cfg.data.batch_size} x {self.world_size} ranks"
            )
        if iters < 1:
            raise ValueError(
                f"the dataset has {len(self.dataset)} images: fewer than one batch of {cfg.data.batch_size} x "
                f"{self.world_size} ranks. Lower data.batch_size or add images."
            )
        self.schedules = build_schedules(cfg, iters, self.world_size)
        self.guard = FiniteGuard(self.device)
        self.output_dir = cfg.train.output_dir
        if cfg.train.fit_to_time and not cfg.train.max_minutes:
            raise ConfigError("train.fit_to_time=true fits the schedule to train.max_minutes; set that too")
        self.schedule_fit: Optional[Dict[str, Any]] = None
        if cfg.train.resume:
            self._maybe_resume()
        else:
            self._move_previous_run()
        if self.schedule_fit is not None:  # a resumed run continues the schedule it was fitted to
            self._set_epochs(self.schedule_fit["fitted_epochs"])
        self._set_total_steps()
        self.logger = MetricsLogger(
            self.output_dir, self.total_steps, self.state.step, cfg.log.jsonl, cfg.log.tensorboard,
            cfg.log.progress_bar, enabled=is_main_process(),
        )

    # ------------------------------------------------------------------------------------------
    # set-up helpers
    # ------------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        if is_main_process():
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "config.yaml"), "w") as fh:
                fh.write(dump_yaml(self.cfg))

    def _set_total_steps(self) -> None:
        self.total_steps = self.schedules.total_iters
        if self.cfg.train.max_steps:
            self.total_steps = min(self.total_steps, self.cfg.train.max_steps)

    def _set_epochs(self, epochs: int) -> None:
        self.cfg.optim.epochs = int(epochs)
        self.schedules = build_schedules(self.cfg, self.schedules.iters_per_epoch, self.world_size)

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _check_attention(self):
        """Verify that the configured attention kernel really runs (no silent fallback); log it."""
        cfg = self.cfg
        tokens = 1 + cfg.model.num_register_tokens + (cfg.crops.global_size // cfg.model.patch_size) ** 2
        report = check_model_attention(self.model.student["backbone"], tokens, self.device,
                                       autocast_dtype=_AUTOCAST_DTYPES.get(cfg.train.precision))
        if is_main_process():
            print(f"[flashdino] {report.describe()}", file=sys.stderr)
        return report

    @property
    def ema(self):
        return self.runtime.ema

    def teacher_backbone_for_eval(self) -> torch.nn.Module:
        """The teacher backbone with all its weights in fp32, for evaluation and plots. Under
        DeepSpeed a consolidated copy (collective: every rank must call it), made once per step
        however many end-of-run callbacks ask for it."""
        step = self.state.step
        if self._eval_teacher is None or self._eval_teacher[0] != step:
            self._eval_teacher = (step, self.runtime.eval_teacher_backbone())
        return self._eval_teacher[1]

    @property
    def image_reader(self):
        """The dataset reader behind the training loader (the torchvision loader wraps it in a
        MultiCropDataset; the DALI loader hands it over as is)."""
        return getattr(self.dataset, "reader", self.dataset)

    def _build_data(self, epoch: int, start_batch: int) -> None:
        cfg = self.cfg
        if cfg.data.pipeline == "dali":
            from flashdino.pipelines.dali import build_dali_loader

            device_id = dali_device_id(self.device)
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
        """Everything an exact resume needs. Collective under DeepSpeed and with several ranks (every
        rank must call it): sharded weights are consolidated, and each rank's RNG state is gathered."""
        state = self.runtime.state_dict()
        state.update({
            "train_state": vars(self.state).copy(),
            "rng": ckpt.rng_state(),
            "config": to_dict(self.cfg),
            "world_size": self.world_size,
            "schedule_fit": self.schedule_fit,
        })
        if is_distributed():
            # Each rank draws its own drop-path / masking randomness; resume must restore all of them.
            gathered: List[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, state["rng"])
            state["rng_per_rank"] = gathered
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.runtime.load_state_dict(state, self.output_dir)
        self.state = TrainState(**state["train_state"])
        self.schedule_fit = state.get("schedule_fit")
        per_rank = state.get("rng_per_rank")
        ckpt.set_rng_state(per_rank[self.rank] if per_rank and len(per_rank) == self.world_size else state["rng"])

    def _maybe_resume(self) -> None:
        if is_main_process() and os.path.isdir(self.output_dir):
            ckpt.remove_stale_temp_files(self.output_dir)
        barrier()  # no rank may look for checkpoints while rank 0 cleans up
        path = ckpt.find_latest(self.output_dir)
        if path is None:
            return
        # Sharded runtimes restore device tensors from their own files; the consolidated copy stays on the host.
        location = "cpu" if self.runtime.name == "deepspeed" else self.device
        state = ckpt.load_checkpoint(path, map_location=location)
        saved_ws = state.get("world_size", 1)
        if saved_ws != self.world_size:
            raise ckpt.CheckpointError(
                f"checkpoint '{path}' was written with world size {saved_ws}, this run has {self.world_size}; "
                f"the schedules and data order would not continue exactly. Start a new output_dir."
            )
        saved_runtime = state.get("runtime", "local" if "optimizer" in state else None)
        if saved_runtime is not None and (saved_runtime == "deepspeed") != (self.runtime.name == "deepspeed"):
            raise ckpt.CheckpointError(
                f"checkpoint '{path}' was written by the {saved_runtime} runtime, this run uses {self.runtime.name}; "
                "the optimizer state is stored differently. Resume with the same runtime.distributed / zero_stage."
            )
        config = to_dict(self.cfg)
        check_checkpoint_fits(path, state, self.model, config)
        self.load_state_dict(state)
        if is_main_process():
            print(f"[flashdino] resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                  f"batch {self.state.batch_in_epoch})", file=sys.stderr)
            warning = changed_settings_warning(state, config)
            if warning:
                print(warning, file=sys.stderr)

    def _move_previous_run(self) -> None:
        """train.resume=false in a folder that holds a run: that run moves to a subfolder first."""
        if is_main_process() and os.path.isdir(self.output_dir):
            moved_to = ckpt.move_previous_run(self.output_dir)
            if moved_to:
                print(f"[flashdino] train.resume=false: the run that was in {self.output_dir} moved to {moved_to} "
                      f"(delete it if it is not needed)", file=sys.stderr)
        barrier()  # no rank writes into output_dir before it is clear

    def save_checkpoint(self) -> Optional[str]:
        """Write checkpoint.pth (rank 0) after every rank wrote its shard files, if the runtime has any.

        checkpoint.pth is the commit point: it names the shard files it belongs to, so a run killed
        while shards are written resumes from the previous complete checkpoint."""
        self.guard.check()  # never write weights produced by a non-finite step
        shards = self.runtime.save_shards(self.output_dir, self.state.step)
        state = self.state_dict()
        state["runtime"] = self.runtime.name
        if shards is not None:
            state["shards"] = shards
        barrier()  # every rank's shards are on disk before the commit point
        path = None
        if is_main_process():
            path = ckpt.save_checkpoint(self.output_dir, state, self.state.step, self.cfg.train.keep_checkpoints)
            self.runtime.prune_shards(self.output_dir)
        barrier()
        return path

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------
    def _to_device(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def train_step(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        cfg, i = self.cfg, self.state.step
        sched = self.schedules.values(i)
        apply_schedule(self.optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
        with phase("h2d"):
            batch = self.runtime.prepare_batch(self._to_device(batch))

        if self.compile_monitor is not None:
            mark_variable_lengths(batch)
        # teacher forward, student forward and the loss (phases marked inside the model)
        with self.runtime.autocast():
            # A 0-d CPU tensor, not a float: a compiled step would otherwise recompile when the
            # teacher-temperature warmup changes the value.
            teacher_temp = torch.tensor(sched["teacher_temp"], dtype=torch.float32)
            losses = self.forward(batch, teacher_temp=teacher_temp)

        with phase("backward"):
            self.runtime.backward(losses["total_loss"])
        with phase("optimizer"):
            # unscale (fp16), clip (spec 1.6), DINO's first-epoch prototype freeze, optimizer step
            freeze = cfg.objective.method == "dino" and self.state.epoch < cfg.objective.freeze_last_layer_epochs
            grad_norms = self.runtime.step(freeze_last_layer=freeze)
        # The guard watches the loss terms and, except in fp16 (whose loss scaler skips a step with
        # inf gradients by design), the gradient norms: a non-finite gradient under a finite loss
        # would otherwise reach the weights, and the next checkpoint, unnoticed.
        self.guard.record(i, losses if cfg.train.precision == "fp16" else {**losses, **grad_norms})
        losses.update(grad_norms)
        with phase("ema"):
            self.runtime.ema_update(sched["momentum"])
        self._watch_compilation(i)

        losses.update({k: torch.tensor(v) for k, v in sched.items()})
        return losses

    def _watch_compilation(self, step: int) -> None:
        """Report compilation after the warm-up step; warn about any later recompile."""
        if self.compile_monitor is None:
            return
        stats = self.compile_monitor.since_start()
        if self.compile_report is None:
            self.compile_report = stats
            self.compile_monitor.reset()
            if is_main_process():
                print(f"[flashdino] torch.compile ({self.cfg.runtime.compile}): {stats.summary()}", file=sys.stderr)
        elif stats.graphs or stats.graph_breaks:
            self.recompiles_after_warmup += stats.graphs
            self.compile_monitor.reset()
            if is_main_process():
                print(f"[flashdino] warning: torch.compile recompiled at step {step} after the warm-up: "
                      f"{stats.summary()}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        cfg, st = self.cfg, self.state
        self._write_config()
        t_start = time.perf_counter()
        signals = StopSignals()
        try:
            with signals if cfg.train.handle_signals else contextlib.nullcontext(signals):
                stopped_early, last = self._train_loop(t_start, signals)
                self.guard.check()
                self.save_checkpoint()
                # Once more after the last save, which a signal may have met: the ranks must agree
                # on whether the end-of-run callbacks (collective under DeepSpeed) run.
                stop_signal = self._agreed_stop_signal(signals)
        finally:
            self.logger.close()
        n = self.schedules.iters_per_epoch
        summary = {
            "steps": st.step,
            "epochs": st.epoch + st.batch_in_epoch / n,
            "images_seen": st.images_seen,
            "train_seconds": time.perf_counter() - t_start,
            "skipped_images": len(st.skipped_files),
            "planned_steps": self.total_steps,
            "stopped_early": stopped_early,
            "stop_signal": stop_signal,
            "schedule_fit": self.schedule_fit,
            "last_metrics": last,
            "output_dir": self.output_dir,
            "runtime": self.runtime.name,
            "attention": self.attention_report.describe(),
        }
        if self.compile_report is not None:
            summary["compile"] = dataclasses.asdict(self.compile_report)
            summary["compile"]["recompiles_after_warmup"] = self.recompiles_after_warmup
        if st.skipped_files and is_main_process():
            print(f"[flashdino] skipped {len(st.skipped_files)} unreadable image file(s); first: "
                  f"{', '.join(st.skipped_files[:5])}", file=sys.stderr)
        if stop_signal:
            # The run is not finished: its end-of-run work (evaluation, plots) belongs to the run that
            # completes it, and a preempted job has seconds left, not minutes.
            if is_main_process():
                how = "run the same command" if cfg.train.resume else "run it again with train.resume=true"
                print(f"[flashdino] stopped by {stop_signal} at step {st.step} of {self.total_steps}; checkpoint "
                      f"written in {self.output_dir}; to resume, {how}", file=sys.stderr)
            return summary
        for cb in self.callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self, summary)
        return summary

    def _agreed_stop_signal(self, signals: StopSignals) -> Optional[str]:
        """The stop signal any rank has received, or None; every rank gets the same answer (a host
        all-reduce, no device sync), so that all stop at the same step."""
        if not self.cfg.train.handle_signals:  # the same on every rank: none of them calls the collective
            return None
        number = max_over_ranks(signals.number, self._host_group)
        return signal.Signals(number).name if number else None

    def _train_loop(self, t_start: float, signals: StopSignals) -> Tuple[Optional[str], Dict[str, float]]:
        """Steps until the schedule ends, train.max_minutes is spent or a stop signal arrives; returns
        (why it stopped early or None, the last logged metrics)."""
        cfg, st = self.cfg, self.state
        n = self.schedules.iters_per_epoch
        log_every = max(1, cfg.train.log_every)
        window_start, window_images, window_first_step = time.perf_counter(), 0, st.step
        data_wait = DataWaitMonitor(cfg.data.num_workers, cfg.data.pipeline, self.device.type == "cuda")
        measure_from: Optional[Tuple[float, int]] = None  # (time, step) where the speed measurement began
        last: Dict[str, float] = {}
        stopped_early = None
        while st.step < self.total_steps and stopped_early is None:
            self._set_epoch(st.epoch, st.batch_in_epoch)
            batches = iter(self.loader)
            while st.step < self.total_steps and st.batch_in_epoch < n:
                with phase("data_wait"):
                    waiting_since = time.perf_counter()
                    batch = next(batches, None)
                    data_wait.add(time.perf_counter() - waiting_since)
                if batch is None:
                    break
                self._count_skipped(batch)
                losses = self._checked_step(batch)
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
                    last = self._logged_values(losses)
                    waited, warning = data_wait.end_window(elapsed, st.step - window_first_step)
                    if warning:
                        self.logger.write(warning)
                    last.update({"epoch": st.epoch, "img/s": window_images / max(elapsed, 1e-9), "data_wait": waited,
                                 "skipped_images": len(st.skipped_files)})
                    for cb in self.callbacks:  # callbacks may add metrics (collapse diagnostics)
                        if hasattr(cb, "on_log"):
                            cb.on_log(self, st.step, last, losses)
                    self.logger.log(st.step, last)
                    # This process's first log window holds the compile warm-up (and a resume's
                    # loader start); the speed is measured from its end over whole windows
                    # spanning a tenth of the budget, so that one slow window cannot decide.
                    if cfg.train.fit_to_time and self.schedule_fit is None:
                        if measure_from is None:
                            measure_from = (time.perf_counter(), st.step)
                        else:
                            seconds_per_step = self._measured_speed_if_due(measure_from)
                            if seconds_per_step is not None:
                                self._fit_schedule_to_time(t_start, seconds_per_step)
                    window_start, window_images, window_first_step = time.perf_counter(), 0, st.step
                stopped_early = self._early_stop_reason(t_start, signals, log_every)
                if stopped_early:
                    self.logger.write(f"[flashdino] stopping: {stopped_early}")
                    break
                if cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint()
            if st.batch_in_epoch >= n:
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                self.save_checkpoint()
        return stopped_early, last

    @staticmethod
    def _logged_values(losses: Dict[str, Any]) -> Dict[str, float]:
        """A log step's scalars: the loss terms averaged over ranks (spec 3.6; each rank's loss is on
        its own B images), the gradient norms as they are (already global after the reduction)."""
        scalars = {k: v for k, v in losses.items() if torch.is_tensor(v) and v.ndim == 0}
        out = mean_over_ranks({k: v for k, v in scalars.items() if k.endswith("_loss")})
        out.update({k: float(v.detach()) for k, v in scalars.items() if not k.endswith("_loss")})
        return {k: out[k] for k in scalars}  # the step's own key order

    def _checked_step(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """train_step; running out of device memory becomes an error that says what to change."""
        try:
            return self.train_step(batch)
        except torch.OutOfMemoryError as exc:
            depth = len(self.model.student["backbone"].blocks)
            raise TrainingOutOfMemoryError(
                out_of_memory_advice(self.cfg, self.state.step, self.device, depth, self.world_size)) from exc

    def _early_stop_reason(self, t_start: float, signals: StopSignals, log_every: int) -> Optional[str]:
        """Why the run stops after this step though its schedule has steps left, or None; every rank
        gets the same answer."""
        st, total = self.state, self.total_steps
        signal_name = self._agreed_stop_signal(signals)  # every step on every rank: it is collective
        if st.step >= total:  # the last step finishes the schedule anyway
            return None
        if signal_name:
            return f"{signal_name} received; stopped at step {st.step} of {total}"
        # One process decides from its own clock every step; several ranks agree at log steps
        # (rank 0's clock), where they synchronize anyway.
        if (self.world_size == 1 or st.step % log_every == 0) and self._time_is_up(t_start):
            return f"train.max_minutes={self.cfg.train.max_minutes:g} reached at step {st.step} of {total}"
        return None

    def _measured_speed_if_due(self, measure_from: Tuple[float, int]) -> Optional[float]:
        """Seconds per step since `measure_from` once that span covers a tenth of train.max_minutes,
        else None; rank 0's clock decides for every rank (they must enter the fit together)."""
        span = time.perf_counter() - measure_from[0]
        steps = self.state.step - measure_from[1]
        due = span >= time_budget.MEASURE_FRACTION * 60.0 * self.cfg.train.max_minutes and steps > 0
        due, seconds_per_step = rank0_values(due, span / steps if steps > 0 else 0.0, device=self.device)
        return seconds_per_step if due else None

    def _fit_schedule_to_time(self, t_start: float, seconds_per_step: float) -> None:
        """Shorten the schedule to the epochs that fit train.max_minutes (see engine/time_budget.py);
        rank 0's measurement decides for every rank."""
        cfg, st = self.cfg, self.state
        planned = epochs = cfg.optim.epochs
        if is_main_process():
            epochs = time_budget.fitted_epochs(
                planned_epochs=planned, warmup_epochs=cfg.optim.warmup_epochs,
                iters_per_epoch=self.schedules.iters_per_epoch, step=st.step, elapsed_s=time.perf_counter() - t_start,
                seconds_per_step=max(seconds_per_step, 1e-9), budget_s=60.0 * cfg.train.max_minutes)
        (epochs,) = rank0_values(epochs, device=self.device)  # rank 0's clock also decides the elapsed time
        epochs = int(epochs)
        fit: Dict[str, Any] = {"planned_epochs": planned, "fitted_epochs": epochs, "at_step": st.step,
                               "seconds_per_step": seconds_per_step, "max_change_of_past_values": {}}
        if epochs < planned:
            old = self.schedules
            self._set_epochs(epochs)
            fit["max_change_of_past_values"] = time_budget.past_value_drift(old, self.schedules, st.step)
            self._set_total_steps()
            self.logger.set_total(self.total_steps)
            self._write_config()  # the run's recorded config is the schedule it runs
        self.schedule_fit = fit  # decided once per run, also when nothing changes
        self.logger.write(f"[flashdino] fit_to_time: {seconds_per_step * 1e3:.1f} ms/step at step {st.step}; "
                          + (f"schedule shortened from {planned} to {epochs} epochs ({self.total_steps} steps) to fit "
                             f"train.max_minutes={cfg.train.max_minutes:g}" if epochs < planned
                             else f"the {planned}-epoch schedule fits train.max_minutes={cfg.train.max_minutes:g}"))

    def _time_is_up(self, t_start: float) -> bool:
        """Whether train.max_minutes is spent; every rank gets rank 0's answer (clocks differ)."""
        limit = self.cfg.train.max_minutes
        if not limit:
            return False
        (up,) = rank0_values(time.perf_counter() - t_start > 60.0 * limit, device=self.device)
        return bool(up)

    def _count_skipped(self, batch: Dict[str, Any]) -> None:
        for path in batch.get("skipped") or []:
            if path not in self.state.skipped_files:
                self.state.skipped_files.append(path)
                self.logger.write(f"[flashdino] skipped unreadable image: {path} "
                                  f"({len(self.state.skipped_files)} so far)")


def train(cfg: Config, callbacks: Optional[List[Callable]] = None) -> Dict[str, Any]:
    return Trainer(cfg, callbacks).fit()

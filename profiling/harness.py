"""The engine and the reference eager implementation, built side by side from one user config.

The *engine* is the user's config as given (fast paths on). The *reference* is the same config
with every fast path switched off: no compile, eager EMA / centering / coding rate, the explicit
math attention, no distributed wrapper. Both are ordinary :class:`~flashdino.engine.trainer.Trainer`
objects; the harnesses drive them step by step with :func:`run_step`, from the same initial
weights (:func:`model_state` / :func:`load_model_state`) and the same batches
(:func:`synthetic_batches` on the device, or :func:`loader_batches` from the real pipeline).
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import itertools
import json
import os
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on a CPU-only machine
    os.environ.setdefault("TRITON_INTERPRET", "1")

from flashdino.engine.config import (Config, ConfigError, build_config, config_differences,  # noqa: E402,F401
                                     flat_dict, set_value, to_dict)

# What turns a config into the reference eager implementation. Keys missing from this version of
# the config tree are skipped (and listed in the report), except the required ones.
REFERENCE_SETTINGS: Dict[str, Any] = {
    "runtime.compile": "none",
    "runtime.kernels.ema": "eager",
    "runtime.kernels.centering": "eager",
    "runtime.kernels.coding_rate": "eager",
    "runtime.attention": "math",
    "runtime.distributed": "none",
    "runtime.cuda_graphs": False,
    "runtime.kernels.optimizer": "torch",
    "runtime.zero_stage": 0,
    "runtime.multicrop": "grouped",  # one backbone call per crop group, the plain way
    "runtime.activation_checkpointing": 0,  # activations kept, not recomputed
}
REQUIRED_REFERENCE_KEYS = ("runtime.compile", "runtime.kernels.ema", "runtime.kernels.centering",
                           "runtime.kernels.coding_rate", "runtime.attention", "runtime.distributed")

# Settings both sides get in a harness run: no files outside a scratch folder, no resume, no logs.
_HARNESS_SETTINGS = {
    "train.resume": False,
    "log.tensorboard": False,
    "log.jsonl": False,
    "log.progress_bar": False,
    "log.plots": False,
    "eval.after_train": False,
}


# ------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise KeyError(key)
        obj = getattr(obj, part)
    return obj


def _apply(cfg: Config, settings: Dict[str, Any], required=()) -> List[str]:
    """Set every key that exists; return the keys this config tree does not have."""
    missing = []
    for key, value in settings.items():
        try:
            _get(cfg, key)
        except KeyError:
            if key in required:
                raise ConfigError(f"harness: the config has no key '{key}', which the reference needs")
            missing.append(key)
            continue
        set_value(cfg, key, value)
    return missing


def harness_config(cfg: Config, data: str = "synthetic", scratch_dir: Optional[str] = None) -> Config:
    """A copy of `cfg` fit for a harness run (scratch output dir, no logging, no resume).

    ``data="synthetic"`` also points the trainer's own loader at the synthetic dataset (the harness
    feeds on-device crops, so the real dataset need not exist here) with enough images for the
    config's ``optim.iters_per_epoch``, so the LR/EMA schedules are those of the real run.
    """
    if data not in ("synthetic", "pipeline"):
        raise ValueError(f"harness: data must be 'synthetic' or 'pipeline', got {data!r}")
    out = copy.deepcopy(cfg)
    _apply(out, _HARNESS_SETTINGS)
    set_value(out, "train.output_dir", scratch_dir or tempfile.mkdtemp(prefix="flashdino-harness-"))
    if data == "synthetic":
        per_step = out.data.batch_size
        n = max(out.data.synthetic_size, per_step * max(out.optim.iters_per_epoch, 1))
        set_value(out, "data.dataset", "synthetic")
        set_value(out, "data.synthetic_size", n)
        set_value(out, "data.num_workers", 0)
        set_value(out, "data.pipeline", "torchvision")
    # "auto" runtime values become what this device would run, so reports show concrete settings
    # and the engine-vs-reference differences are the real ones.
    from flashdino.engine.runtime.auto import resolve_auto
    from flashdino.engine.trainer import resolve_device

    return resolve_auto(out, resolve_device(out.train.device))


def reference_config(cfg: Config) -> Tuple[Config, List[str]]:
    """(the reference eager config derived from `cfg`, keys of REFERENCE_SETTINGS this tree lacks)."""
    ref = copy.deepcopy(cfg)
    missing = _apply(ref, REFERENCE_SETTINGS, REQUIRED_REFERENCE_KEYS)
    return ref, missing


_VOLATILE_KEYS = ("train.output_dir", "train.resume", "data.path", "log.", "eval.")


def config_hash(cfg: Config) -> str:
    """A short hash of everything that changes what a step computes (not paths or logging)."""
    flat = {k: v for k, v in flat_dict(cfg).items() if not k.startswith(_VOLATILE_KEYS)}
    return hashlib.sha1(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:10]


def config_label(cfg: Config, config_file: Optional[str] = None) -> str:
    base = cfg.preset or (os.path.splitext(os.path.basename(config_file))[0] if config_file else "custom")
    return f"{base}-{cfg.train.precision}-{config_hash(cfg)}"


def config_from_cli(preset: Optional[str], config_file: Optional[str], overrides: List[str]) -> Config:
    """Same merge as `flashdino train`: the demo preset when neither a preset nor a file is given."""
    return build_config(preset or (None if config_file else "demo"), config_file, list(overrides or []))


# ------------------------------------------------------------------------------------------
# trainers and state
# ------------------------------------------------------------------------------------------


def check_single_process() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise RuntimeError(f"the profiling harnesses run in one process (WORLD_SIZE={world}); run them without torchrun")


def build_trainer(cfg: Config):
    """A trainer that compiles from scratch. Without the reset, graphs another trainer of this process
    compiled (the suite's parity stage, under its fallback_random; the engine side, for the variant)
    would be reused: a compile time of ~0 reported, and the other stage's settings measured. A
    trainer built earlier recompiles if it is used again afterwards."""
    from flashdino.engine.trainer import Trainer

    check_single_process()
    torch._dynamo.reset()
    return Trainer(cfg)


def unwrap_model(trainer) -> torch.nn.Module:
    from flashdino.engine.meta_arch import unwrap

    return unwrap(trainer.model)


def model_state(trainer, device: str = "cpu") -> Dict[str, Dict[str, torch.Tensor]]:
    """Detached copies of student, teacher and the loss buffers (DINO centers)."""
    model = unwrap_model(trainer)
    take = lambda sd: {k: v.detach().to(device, copy=True) for k, v in sd.items()}  # noqa: E731
    return {
        "student": take(model.student.state_dict()),
        "teacher": take(model.teacher.state_dict()),
        "buffers": take({k: v for k, v in model.named_buffers() if not k.startswith(("student.", "teacher."))}),
    }


@torch.no_grad()
def load_model_state(trainer, state: Dict[str, Dict[str, torch.Tensor]]) -> float:
    """Copy `state` into the trainer's model in place (optimizer/EMA pointers stay valid).

    Returns the largest absolute difference left after the copy, read back from the model: 0 unless
    the engine keeps a private copy of the weights that a plain copy does not reach.
    """
    model = unwrap_model(trainer)
    model.student.load_state_dict(state["student"])
    model.teacher.load_state_dict(state["teacher"])
    for name, value in state["buffers"].items():
        getattr(model, name).copy_(value)
    now = model_state(trainer)
    worst = 0.0
    for part in ("student", "teacher", "buffers"):
        for k, v in state[part].items():
            if v.is_floating_point():
                worst = max(worst, float((now[part][k].double() - v.double()).abs().max()) if v.numel() else 0.0)
    return worst


def free_memory() -> None:
    """Give a dropped trainer's device memory back before the next one is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def seed_step(seed: int, step: int) -> None:
    """Same global RNG state before the same step on both sides (drop path draws from it)."""
    torch.manual_seed(seed * 1_000_003 + step)


def run_step(trainer, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """One optimizer step, with the bookkeeping `Trainer.fit` does around `train_step`."""
    losses = trainer.train_step(batch)
    st = trainer.state
    st.step += 1
    st.batch_in_epoch += 1
    st.images_seen += batch["global_crops"].shape[0] // 2
    if st.batch_in_epoch >= trainer.schedules.iters_per_epoch:
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
    return losses


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def synthetic_batch(cfg: Config, device: torch.device, index: int, seed: int = 0) -> Dict[str, Any]:
    """One batch in the loaders' layout (crop-major), made on the host from (seed, index), then
    moved to `device` once. Crops are standard-normal (like normalized images); v2 methods get
    masks drawn by the same per-batch iBOT sampler the loader uses."""
    from flashdino.pipelines.loader import build_masking
    from flashdino.pipelines.masking import mask_indices_and_weights

    b, c = cfg.data.batch_size, cfg.model.in_chans
    g, l, n_local = cfg.crops.global_size, cfg.crops.local_size, cfg.crops.n_local
    gen = torch.Generator().manual_seed(seed * 7919 + index)
    batch: Dict[str, Any] = {
        "global_crops": torch.randn(2 * b, c, g, g, generator=gen),
        "local_crops": torch.randn(n_local * b, c, l, l, generator=gen) if n_local else None,
        "labels": torch.randint(0, 10, (b,), generator=gen),
        "masks": None, "mask_indices": None, "mask_weights": None,
        "n_skipped": 0, "skipped": [],
    }
    masking = build_masking(cfg)
    if masking is not None:
        masks = masking(2 * b, np.random.default_rng([seed, index]))
        batch["masks"] = masks
        batch["mask_indices"], batch["mask_weights"] = mask_indices_and_weights(masks)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def synthetic_batches(cfg: Config, device: torch.device, pool: int = 4, seed: int = 0) -> Iterator[Dict[str, Any]]:
    """An endless cycle over `pool` distinct on-device batches (no data cost inside the timed steps)."""
    if pool < 1:
        raise ValueError(f"synthetic_batches: pool must be >= 1, got {pool}")
    made = [synthetic_batch(cfg, device, i, seed) for i in range(pool)]
    return itertools.cycle(made)


def loader_batches(trainer) -> Iterator[Dict[str, Any]]:
    """The trainer's own data pipeline, epoch after epoch (what `Trainer.fit` iterates)."""
    epoch = trainer.state.epoch
    while True:
        trainer._set_epoch(epoch, 0)
        produced = 0
        for batch in trainer.loader:
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError("loader_batches: the data pipeline produced no batch in a whole epoch")
        epoch += 1


# A model small enough for a CPU smoke run of any harness (tests, `--preset X $(...)` by hand).
SMOKE_OVERRIDES = [
    "model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    "model.img_size=32", "head.hidden_dim=32", "head.bottleneck_dim=16", "head.n_prototypes=64",
    "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "data.batch_size=4",
    "optim.epochs=2", "optim.warmup_epochs=1", "optim.iters_per_epoch=4",
]

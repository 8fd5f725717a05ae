"""The backbone an evaluation runs on: the teacher (or student) of a training checkpoint, or the
same architecture at its random initialization (the baseline a run must beat)."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

from flashdino.engine import checkpoint as ckpt
from flashdino.engine.config import Config, from_dict
from flashdino.engine.models import VisionTransformer, build_backbone
from flashdino.engine.models.attention import HALF_ONLY_BACKENDS

WHICH = ("teacher", "student")


def config_of_checkpoint(state: dict, path: str) -> Config:
    if "config" not in state:
        raise ckpt.CheckpointError(f"checkpoint '{path}' has no 'config' entry; it was not written by flashdino train")
    return from_dict(state["config"])


def backbone_state(state: dict, which: str, path: str) -> dict:
    """The `which` backbone's weights with wrapper prefixes removed (spec 5: teacher, no head)."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if which not in state:
        raise ckpt.CheckpointError(f"checkpoint '{path}' has no '{which}' entry (keys: {', '.join(state)})")
    weights = state[which]
    backbone = {k: v for k, v in weights.items() if k.startswith("backbone.") or ".backbone." in k}
    return ckpt.strip_prefixes(backbone if backbone else weights)


def load_backbone(path: str, which: str = "teacher", device: Optional[torch.device] = None,
                  attention: Optional[str] = None) -> Tuple[VisionTransformer, Config, dict]:
    """(backbone in eval mode, the run's config, checkpoint info) from a ``flashdino train`` checkpoint."""
    state = ckpt.load_checkpoint(path)
    cfg = config_of_checkpoint(state, path)
    model = build_backbone(cfg.model, teacher=True, attention=attention or eval_attention(cfg, device))
    weights = backbone_state(state, which, path)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"checkpoint '{path}': the {which} backbone does not match the config's architecture "
            f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})"
        )
    info = {"checkpoint": path, "which": which, "step": state.get("train_state", {}).get("step")}
    return model.to(device or "cpu").eval(), cfg, info


def random_init_backbone(cfg: Config, device: Optional[torch.device] = None, seed: Optional[int] = None) -> VisionTransformer:
    """The run's architecture at initialization: seeded like the trainer seeds itself before it
    builds the student backbone first, so with the run's seed these are the run's initial weights."""
    seed = cfg.train.seed if seed is None else seed
    devices = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = build_backbone(cfg.model, attention=eval_attention(cfg, device))
    for block in model.blocks:  # evaluation: no stochastic depth (eval() disables it too)
        block.drop_path = 0.0
    return model.to(device or "cpu").eval()


def eval_attention(cfg: Config, device) -> str:
    # GPU-only attention backends (flash, cudnn, flash_attn) cannot run a CPU evaluation.
    name = cfg.runtime.attention
    on_cpu = device is None or torch.device(device).type == "cpu"
    return "sdpa" if on_cpu and name in HALF_ONLY_BACKENDS else name


@contextlib.contextmanager
def prepared_for_eval(backbone, amp_dtype: Optional[torch.dtype]):
    """Run a (possibly trained, compiled) backbone for evaluation, and restore it afterwards:

    * SDPA instead of a half-only attention kernel while no fp16/bf16 autocast is on (the fp32
      protocol, attention plots): a run trained with runtime.attention=flash hands its teacher to
      the k-NN after training in fp32, where those kernels cannot run;
    * its per-block compiled graphs left aside (eager), so evaluation's new shapes do not recompile.
    """
    from flashdino.engine.runtime.compile import uncompiled

    name = getattr(backbone, "attention_backend", None)
    swap = name in HALF_ONLY_BACKENDS and amp_dtype not in (torch.float16, torch.bfloat16)
    if swap:
        backbone.set_attention_backend("sdpa")
    try:
        with uncompiled(backbone):
            yield
    finally:
        if swap:
            backbone.set_attention_backend(name)

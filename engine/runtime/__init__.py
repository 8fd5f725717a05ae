"""The fast, sharded runtime around the eager model: torch.compile, attention-kernel checks, DDP and
DeepSpeed ZeRO 1/2/3 with a sharded teacher EMA.

``build_runtime(cfg, model, device, world_size)`` picks the runtime (see :mod:`.ddp` for the rules):

* :class:`~.local.LocalRuntime` — one process, or DDP;
* :class:`~.deepspeed_backend.DeepSpeedRuntime` — DeepSpeed (ZeRO stage ``runtime.zero_stage``).

Compilation (:mod:`.compile`) and the attention check (:mod:`.attention_check`) are independent of it.
"""
from __future__ import annotations

import torch

from .ddp import DistributedConfigError, resolve_runtime


class PackingNotAvailableError(ValueError):
    """runtime.pack_crops=true: see docs/DISTRIBUTED.md, "Multi-crop execution"."""


def build_runtime(cfg, model, device: torch.device, world_size: int):
    if cfg.runtime.pack_crops:
        # Packing the token-wise layers of both crop groups into one call saves one group's kernel
        # launches per layer (~1 % of a ViT-B step at 64 images, less under CUDA graphs) while the
        # per-group GEMMs are already ~24k rows each; it does not pay at these batch sizes.
        raise PackingNotAvailableError(
            "runtime.pack_crops=true is not implemented: the student runs one backbone call per crop resolution "
            "(2B global, L*B local), which already gives full-size matmuls; packing would only save kernel "
            "launches (see docs/DISTRIBUTED.md, 'Multi-crop execution'). Set runtime.pack_crops=false."
        )
    kind = resolve_runtime(cfg.runtime.distributed, cfg.runtime.zero_stage, world_size)
    if kind == "deepspeed":
        from .deepspeed_backend import DeepSpeedRuntime

        return DeepSpeedRuntime(cfg, model, device, world_size)
    from .local import LocalRuntime

    return LocalRuntime(cfg, model, device, distributed=kind == "ddp")


__all__ = ["DistributedConfigError", "PackingNotAvailableError", "build_runtime", "resolve_runtime"]

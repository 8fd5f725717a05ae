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


def build_runtime(cfg, model, device: torch.device, world_size: int):
    kind = resolve_runtime(cfg.runtime.distributed, cfg.runtime.zero_stage, world_size)
    if kind == "deepspeed":
        from .deepspeed_backend import DeepSpeedRuntime

        return DeepSpeedRuntime(cfg, model, device, world_size)
    from .local import LocalRuntime

    return LocalRuntime(cfg, model, device, distributed=kind == "ddp")


__all__ = ["DistributedConfigError", "build_runtime", "resolve_runtime"]

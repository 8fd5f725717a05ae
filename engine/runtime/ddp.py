"""Which data-parallel runtime a run uses, and the plain DDP wrapper.

``runtime.distributed``:

| value       | one process                       | several processes                              |
|-------------|-----------------------------------|------------------------------------------------|
| "auto"      | none (or DeepSpeed if zero_stage) | DeepSpeed when ``zero_stage`` > 0, else DDP    |
| "none"      | none                              | error: the ranks would train unsynchronised    |
| "ddp"       | none                              | DDP (``zero_stage`` must be 0)                 |
| "deepspeed" | DeepSpeed                         | DeepSpeed ZeRO-``zero_stage`` (0 = plain DP)   |
"""
from __future__ import annotations

from torch import nn

RUNTIMES = ("local", "ddp", "deepspeed")


class DistributedConfigError(ValueError):
    """runtime.distributed / runtime.zero_stage / precision do not fit together or with the launch."""


def resolve_runtime(distributed: str, zero_stage: int, world_size: int) -> str:
    """"local", "ddp" or "deepspeed" for the config values and the launched world size."""
    if distributed == "none":
        if world_size > 1:
            raise DistributedConfigError(
                f"runtime.distributed=none but {world_size} processes were launched: their gradients would never "
                "be averaged. Use runtime.distributed=auto (DDP, or DeepSpeed with runtime.zero_stage > 0)."
            )
        return "local"
    if distributed == "ddp":
        if zero_stage:
            raise DistributedConfigError(
                f"runtime.zero_stage={zero_stage} needs runtime.distributed=deepspeed (or auto); DDP has no ZeRO stages"
            )
        return "ddp" if world_size > 1 else "local"
    if distributed == "deepspeed":
        return "deepspeed"
    if distributed == "auto":
        if zero_stage:
            return "deepspeed"
        return "ddp" if world_size > 1 else "local"
    raise DistributedConfigError(f"unknown runtime.distributed={distributed!r}; valid: auto, none, ddp, deepspeed")


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel over the whole meta-architecture.

    The teacher's parameters do not require grad, so DDP ignores them for reduction (it still checks
    at construction that every rank starts from the same weights). Buffers are not broadcast each
    step: the DINO centers are all-reduced inside the loss, so every rank holds the same values.

    No ``device_ids``, even on a GPU (allowed for a single-device module): with them DDP copies every
    tensor input to the device, and the teacher temperature, a 0-d CPU tensor, would arrive on the
    GPU by a blocking copy and be read back by the loss: two host syncs per step (spec T12). The
    trainer moves the batch itself, asynchronously from pinned memory.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=None, broadcast_buffers=False)

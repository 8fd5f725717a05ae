"""What to change when a training step runs out of device memory.

PyTorch's out-of-memory message names the allocation that failed; a user needs the knobs of this
engine that lower the peak, in the order they cost least: fewer images per step, recomputed block
activations, sharded optimizer state, a 16-bit precision.
"""
from __future__ import annotations

from typing import List

import torch


class TrainingOutOfMemoryError(RuntimeError):
    """A training step ran out of device memory; the message says what to change."""


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB"


def out_of_memory_advice(cfg, step: int, device: torch.device, depth: int, world_size: int) -> str:
    """The message for an out-of-memory error at `step` (0-based) of a run with config `cfg`."""
    where = str(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        where += f" (peak {_gib(torch.cuda.max_memory_allocated(device))} allocated of {_gib(total)})"
    options: List[str] = [f"fewer images per step: data.batch_size={cfg.data.batch_size} per rank now"]
    blocks = cfg.runtime.activation_checkpointing
    if blocks < depth:
        options.append(f"recompute block activations in the backward: runtime.activation_checkpointing="
                       f"{min(depth, max(blocks * 2, depth // 2))} (now {blocks} of the student's {depth} blocks)")
    if world_size > 1 and not (cfg.runtime.distributed == "deepspeed" and cfg.runtime.zero_stage >= 2):
        options.append(f"shard gradients and optimizer state over the {world_size} ranks: "
                       "runtime.distributed=deepspeed runtime.zero_stage=2 (or 3, the weights too)")
    if cfg.train.precision == "fp32":
        options.append("16-bit activations: train.precision=bf16 (or fp16)")
    listed = "".join(f"\n  - {o}" for o in options)
    return (f"out of device memory in training step {step} on {where}. Training stopped; the last "
            f"checkpoint on disk was written before this step and is intact. To lower the peak:{listed}")

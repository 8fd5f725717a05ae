"""Process-group helpers. Every function works unchanged in a single process (world size 1)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place SUM across ranks (no autograd). Identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _AllReduceSum(torch.autograd.Function):
    """SUM all-reduce whose backward all-reduces the upstream gradient (spec trap T15).

    The forward value is the global sum on every rank. Every rank's loss depends on every rank's
    input, so d(sum_r loss_r)/d x_k = sum_r grad_r: the backward is itself a SUM all-reduce.
    DDP then averages the resulting gradients over ranks.
    """

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def rank0_values(*values: float, device=None) -> list:
    """Rank 0's `values` on every rank (decisions taken from one clock); unchanged in one process."""
    if get_world_size() == 1:  # also a one-rank group (DeepSpeed makes one): no collective, no sync
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def mean_over_ranks(values: dict) -> dict:
    """{name: 0-d tensor} -> {name: float}, each the mean over ranks: one all-reduce of them stacked
    (a log step's single sync); this rank's values in one process. Every rank must call it."""
    names = list(values)
    if not names:
        return {}
    stacked = torch.stack([values[k].detach().reshape(()).to(torch.float64) for k in names])
    if get_world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        stacked /= get_world_size()
    return dict(zip(names, stacked.tolist()))


def host_group():
    """A gloo group over every rank for small host-side agreements, which then need no device sync:
    the default group when that is gloo already; None in a single process. Every rank must call it,
    at the same point (creating a group is collective)."""
    if not is_distributed():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def max_over_ranks(value: int, group=None) -> int:
    """The largest of every rank's `value` (an int on the host), on every rank; `value` in one process."""
    if get_world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def all_reduce_sum_differentiable(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable SUM across ranks; identity in a single process."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun / deepspeed environment variables.

    Returns True when a multi-process run was set up. Picks NCCL with CUDA, gloo otherwise.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """End a multi-process run cleanly: every rank waits for the others, then tears the process
    group down. Exiting with the group alive lets the interpreter destroy gloo/NCCL threads that
    are still joinable, which can abort a finished run at exit ("terminate called without an
    active exception", a non-zero exit code after a complete run)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()

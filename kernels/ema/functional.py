"""``adamw_ema_``: one AdamW step of the student plus the teacher EMA, on flat tensors.

Flat means "one contiguous tensor per role" — a whole flat parameter buffer or any slice of it,
so a ZeRO rank calls it on the shard it owns. Elementwise, so shards compose exactly.
"""
from __future__ import annotations

import torch
from torch.optim.adamw import adamw as torch_adamw

from .._common import check_dtype, check_kind
from .eager import lerp_weight

_FP32 = (torch.float32,)


def validate_adamw_ema(what, master, grad, exp_avg, exp_avg_sq, teacher, model_copy, betas, eps, lr,
                       weight_decay) -> None:
    check_dtype(what, "master", master, _FP32)
    check_dtype(what, "exp_avg", exp_avg, _FP32)
    check_dtype(what, "exp_avg_sq", exp_avg_sq, _FP32)
    check_dtype(what, "grad", grad)
    check_dtype(what, "teacher", teacher)
    if model_copy is not None:
        check_dtype(what, "model_copy", model_copy)
    n = master.numel()
    named = dict(grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, teacher=teacher, model_copy=model_copy)
    for name, t in named.items():
        if t is None:
            continue
        if t.numel() != n:
            raise ValueError(f"{what}: {name} has {t.numel()} elements, master has {n}")
        if t.device != master.device:
            raise ValueError(f"{what}: {name} is on {t.device}, master on {master.device}")
    if grad.is_sparse:
        raise ValueError(f"{what}: sparse gradients are not supported")
    b1, b2 = betas
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"{what}: betas must be in [0, 1), got {betas}")
    if eps < 0 or lr < 0 or weight_decay < 0:
        raise ValueError(f"{what}: lr, eps and weight_decay must be >= 0 (got lr={lr}, eps={eps}, "
                         f"weight_decay={weight_decay})")


@torch.no_grad()
def adamw_ema_eager_(master, grad, exp_avg, exp_avg_sq, teacher, *, lr, weight_decay, betas, eps, step,
                     momentum, model_copy=None) -> None:
    """The reference: torch's own multi-tensor AdamW, then ``_foreach_lerp_`` (fp32)."""
    if step < 1:
        raise ValueError(f"AdamW step count must be >= 1 (the step being taken), got {step}")
    master_v, grad_v = master.view(-1), grad.view(-1).float()
    state_step = torch.tensor(float(step - 1))
    torch_adamw([master_v], [grad_v], [exp_avg.view(-1)], [exp_avg_sq.view(-1)], [], [state_step],
                            foreach=True, amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr,
                            weight_decay=weight_decay, eps=eps, maximize=False)
    if model_copy is not None:
        model_copy.view(-1).copy_(master_v)
    weight = lerp_weight(momentum)
    if teacher.dtype == torch.float32:
        torch._foreach_lerp_([teacher.view(-1)], [master_v], weight)
    else:
        t32 = teacher.view(-1).float()
        t32.lerp_(master_v, weight)
        teacher.view(-1).copy_(t32)


def adamw_ema_(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               teacher: torch.Tensor, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
               step: int, momentum: float, model_copy: torch.Tensor | None = None, kind: str = "triton") -> None:
    """In place: AdamW (PyTorch semantics, decoupled decay ×lr, bias correction) on ``master``,
    then ``teacher ← momentum·teacher + (1−momentum)·master``; optionally ``model_copy ← master``.

    master/exp_avg/exp_avg_sq: fp32; grad, teacher, model_copy: fp32/bf16/fp16. ``step`` is the
    1-based index of this step (bias correction). All tensors have the same number of elements.
    """
    check_kind(kind, "adamw_ema_")
    what = f"adamw_ema_ ({kind})"
    validate_adamw_ema(what, master, grad, exp_avg, exp_avg_sq, teacher, model_copy, betas, eps, lr, weight_decay)
    fn = adamw_ema_eager_
    if kind == "triton":
        from .triton_ema import adamw_ema_triton_ as fn
    fn(master, grad, exp_avg, exp_avg_sq, teacher, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
       step=step, momentum=momentum, model_copy=model_copy)

"""``FusedAdamWEMA``: AdamW on the student and the teacher EMA in one pass over the parameters.

``step(momentum)`` is equivalent to ``torch.optim.AdamW.step()`` followed by
``torch._foreach_lerp_(teacher, student, 1 - momentum)``: same hyper-parameters, per-parameter
step counts (a parameter without a gradient is skipped by AdamW, as in torch, but its teacher
still follows it), decoupled weight decay multiplied by the LR, bias correction.

Master weights: when the model parameters are bf16/fp16 the optimizer keeps fp32 master copies
(in its state, key ``master``); each step updates the master, writes the rounded model copy and
moves the teacher towards the fp32 master. The optimizer state lives in one flat fp32 buffer per
device (per-parameter views in ``state``), so it checkpoints like any torch optimizer.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Sequence

import torch
from torch.optim.adamw import adamw as torch_adamw

from .._common import check_kind, check_triton_tensors, pointer_table
from .eager import EagerEMAUpdater, _pair_params, lerp_weight

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


class FusedAdamWEMA(torch.optim.Optimizer):
    """AdamW + teacher EMA. ``teacher_params``: a mapping student parameter -> teacher tensor, or a
    sequence aligned with the parameters in ``param_groups`` order. ``kind``: "triton" | "eager"."""

    def __init__(self, params, teacher_params: Sequence[torch.Tensor], lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 master_weights: bool | None = None, kind: str = "triton"):
        self.kind = check_kind(kind, "FusedAdamWEMA")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"FusedAdamWEMA: betas must be in [0, 1), got {betas}")
        self._constructed = False
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._constructed = True
        student = self._all_params()
        if isinstance(teacher_params, Mapping):
            missing = [i for i, p in enumerate(student) if p not in teacher_params]
            if missing:
                raise ValueError(f"FusedAdamWEMA: no teacher tensor for parameter {missing[0]} "
                                 f"(shape {tuple(student[missing[0]].shape)})")
            teacher_params = [teacher_params[p] for p in student]
        teacher, _ = _pair_params(teacher_params, student, "FusedAdamWEMA")
        low = [i for i, p in enumerate(student) if p.dtype != torch.float32]
        if master_weights is None:
            master_weights = bool(low)
        if low and not master_weights:
            raise ValueError(f"FusedAdamWEMA: parameter {low[0]} is {student[low[0]].dtype}; "
                             "low-precision parameters need master_weights=True (fp32 masters)")
        self.master_weights = bool(master_weights)
        for i, p in enumerate(student):
            if not p.is_contiguous() or not teacher[i].is_contiguous():
                raise ValueError(f"FusedAdamWEMA: parameter {i} (shape {tuple(p.shape)}) or its teacher "
                                 "is not contiguous")
        if self.kind == "triton":
            check_triton_tensors("FusedAdamWEMA", student + teacher)
        self._teacher = {p: t for p, t in zip(student, teacher)}
        self._steps = {p: 0 for p in student}
        self._allocate_state(student)
        self._eager_ema = None  # eager kind: one _foreach_lerp_ over every (teacher, master) pair
        self._cache = {}  # triton kind: pointer tables per launch, rebuilt when a storage moves
        self.table_rebuilds = 0
        self.steps_taken = 0  # step() calls; a GradScaler skips step() on inf gradients (see ema_step)

    # ---------------------------------------------------------------------------- set-up
    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def add_param_group(self, param_group):
        if getattr(self, "_constructed", False):
            raise RuntimeError("FusedAdamWEMA: add_param_group after construction is not supported "
                               "(the student/teacher pairing is fixed at construction)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def _allocate_state(self, params):
        by_device = defaultdict(list)
        for p in params:
            by_device[p.device].append(p)
        self._flat = {}
        for device, ps in by_device.items():
            keys = _STATE_KEYS if self.master_weights else _STATE_KEYS[:2]
            # Round every view's start up to 4 elements (16 bytes) so the kernels can vectorize.
            padded = sum((p.numel() + 3) // 4 * 4 for p in ps)
            flat = {k: torch.zeros(padded, dtype=torch.float32, device=device) for k in keys}
            self._flat[device] = flat
            off = 0
            for p in ps:
                n = p.numel()
                st = self.state[p]
                for k in keys:
                    st[k] = flat[k][off:off + n].view_as(p)
                if self.master_weights:
                    st["master"].copy_(p)
                off += (n + 3) // 4 * 4

    def _master(self, p):
        return self.state[p]["master"] if self.master_weights else p

    @torch.no_grad()
    def refresh_master_weights(self) -> None:
        """Copy the model parameters into the fp32 masters (after loading weights into the model)."""
        if self.master_weights:
            for p in self._all_params():
                self.state[p]["master"].copy_(p)

    # ---------------------------------------------------------------------------- step
    def _buckets(self, group, with_adam: bool = True):
        """Split a group into launches: parameters with gradients by (step, dtypes); the rest EMA only
        (all of them without `with_adam`)."""
        adam, ema_only = defaultdict(list), defaultdict(list)
        for p in group["params"]:
            t = self._teacher[p]
            if p.grad is None or not with_adam:
                ema_only[(t.device, t.dtype)].append(p)
                continue
            if p.grad.is_sparse:
                raise ValueError("FusedAdamWEMA: sparse gradients are not supported")
            if not p.grad.is_contiguous():  # the kernels read it in memory order (autograd's grads are)
                raise ValueError(f"FusedAdamWEMA: the gradient of a parameter of shape {tuple(p.shape)} is not "
                                 f"contiguous (strides {p.grad.stride()})")
            copy_dtype = p.dtype if self.master_weights else None
            adam[(p.device, self._steps[p] + 1, p.grad.dtype, t.dtype, copy_dtype)].append(p)
        return adam, ema_only

    @torch.no_grad()
    def step(self, momentum: float, closure=None):
        """AdamW on every parameter with a gradient, then the EMA of every teacher parameter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        lerp_weight(momentum)  # validates the momentum before anything changes
        if self.kind == "eager":
            self._step_eager(momentum)
        else:
            self._step_triton(momentum)
        self.steps_taken += 1
        return loss

    @torch.no_grad()
    def ema_step(self, momentum: float) -> None:
        """The teacher EMA alone, from the current weights: what a step the GradScaler skipped (inf
        gradients) still does, as the eager path's separate EMA and the reference do."""
        lerp_weight(momentum)
        if self.kind == "eager":
            self._eager_ema_update(momentum)
        else:
            self._step_triton(momentum, with_adam=False)

    def _step_eager(self, momentum):
        for group in self.param_groups:
            adam, _ = self._buckets(group)
            b1, b2 = group["betas"]
            for (_, step, _, _, _), ps in adam.items():
                masters = [self._master(p) for p in ps]
                grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in ps]
                steps = [torch.tensor(float(step - 1)) for _ in ps]
                torch_adamw(masters, grads, [self.state[p]["exp_avg"] for p in ps],
                                        [self.state[p]["exp_avg_sq"] for p in ps], [], steps, foreach=True,
                                        amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"],
                                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
                if self.master_weights:
                    torch._foreach_copy_(ps, masters)
                for p in ps:
                    self._steps[p] = step
        self._eager_ema_update(momentum)

    def _eager_ema_update(self, momentum):
        if self._eager_ema is None:
            params = self._all_params()
            self._eager_ema = EagerEMAUpdater([self._teacher[p] for p in params], [self._master(p) for p in params])
        self._eager_ema.update(momentum)

    def _table(self, key, columns, fixed=()):
        # Only storages that can move are compared each step (``fixed``: our own state buffers).
        sig = tuple(t.data_ptr() if t is not None else 0 for c, col in enumerate(columns) if c not in fixed
                    for t in col)
        hit = self._cache.get(key)
        if hit is None or hit[0] != sig:
            if hit is not None:
                self.table_rebuilds += 1
            device = next(t for t in columns[0]).device
            hit = (sig,) + pointer_table(columns, _chunk(), device)
            self._cache[key] = hit
        return hit[1], hit[2]

    def _step_triton(self, momentum, with_adam: bool = True):
        from .triton_ema import adamw_scalars, launch_adamw_ema, launch_ema

        for gi, group in enumerate(self.param_groups):
            adam, ema_only = self._buckets(group, with_adam)
            b1, b2 = group["betas"]
            for key, ps in adam.items():
                _, step, g_dtype, t_dtype, c_dtype = key
                columns = [[self._master(p) for p in ps], [p.grad for p in ps],
                           [self.state[p]["exp_avg"] for p in ps], [self.state[p]["exp_avg_sq"] for p in ps],
                           [self._teacher[p] for p in ps], [p if self.master_weights else None for p in ps]]
                table, aligned = self._table(("adam", gi) + key[:1] + key[2:] + (len(ps),), columns,
                                             fixed=(2, 3) if not self.master_weights else (0, 2, 3))
                scalars = adamw_scalars(group["lr"], group["weight_decay"], b1, b2, group["eps"], step, momentum)
                launch_adamw_ema(table, aligned, scalars, g_dtype, t_dtype, c_dtype)
                for p in ps:
                    self._steps[p] = step
            for key, ps in ema_only.items():
                columns = [[self._teacher[p] for p in ps], [self._master(p) for p in ps]]
                table, aligned = self._table(("ema", gi) + key + (len(ps),), columns)
                launch_ema(table, aligned, lerp_weight(momentum), key[1], torch.float32)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self):
        for p in self._all_params():
            self.state[p]["step"] = torch.tensor(float(self._steps[p]))
        out = super().state_dict()
        out["master_weights"] = self.master_weights
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Restore into the existing flat buffers (torch's loader would cast fp32 state to the
        parameters' dtype, which loses the masters of bf16/fp16 models)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"FusedAdamWEMA.load_state_dict: {len(groups)} saved groups, "
                             f"{len(self.param_groups)} here")
        if bool(state_dict.get("master_weights", self.master_weights)) != self.master_weights:
            raise ValueError("FusedAdamWEMA.load_state_dict: saved master_weights setting differs")
        saved_state = state_dict["state"]
        for group, saved in zip(self.param_groups, groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError("FusedAdamWEMA.load_state_dict: a group's parameter count differs")
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if k == "betas" else v
            for p, idx in zip(group["params"], saved["params"]):
                st = saved_state.get(idx)
                if st is None:
                    self._steps[p] = 0
                    continue
                for k in _STATE_KEYS:
                    if k in self.state[p] and k in st:
                        if tuple(st[k].shape) != tuple(p.shape):
                            raise ValueError(f"FusedAdamWEMA.load_state_dict: state {k!r} of parameter {idx} "
                                             f"has shape {tuple(st[k].shape)}, parameter {tuple(p.shape)}")
                        self.state[p][k].copy_(st[k])
                self._steps[p] = int(st.get("step", 0))
                if self.master_weights:
                    p.copy_(self.state[p]["master"])


def _chunk():
    from .triton_ema import CHUNK

    return CHUNK

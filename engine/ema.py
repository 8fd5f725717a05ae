"""Eager teacher EMA (spec 1.7): theta_t <- m * theta_t + (1 - m) * theta_s, parameters only.

This is the reference the fused Triton updater (flashdino.kernels) is checked against.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn


def paired_parameters(teacher: nn.Module, student: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Teacher and student parameters matched by name; every teacher parameter must have a twin."""
    student_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        if name not in student_params:
            raise KeyError(f"teacher parameter '{name}' has no student counterpart")
        s = student_params[name]
        if s.shape != t.shape:
            raise ValueError(f"teacher/student shape mismatch for '{name}': {tuple(t.shape)} vs {tuple(s.shape)}")
        t_list.append(t)
        s_list.append(s)
    return t_list, s_list


class EagerEMA:
    """One `_foreach_lerp_` over all teacher parameters."""

    def __init__(self, teacher_params: List[torch.Tensor], student_params: List[torch.Tensor]):
        self.teacher = [p.data for p in teacher_params]
        self.student = [p.data for p in student_params]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        # lerp(t, s, w) = t + w (s - t) = m t + (1 - m) s with w = 1 - m
        if self.teacher[0].dtype == self.student[0].dtype:
            torch._foreach_lerp_(self.teacher, self.student, 1.0 - momentum)
        else:  # mixed-precision copies: lerp needs equal dtypes
            torch._foreach_lerp_(self.teacher, [s.to(t.dtype) for s, t in zip(self.student, self.teacher)], 1.0 - momentum)


def build_ema(kind: str, teacher: nn.Module, student: nn.Module):
    """`kind` = "eager" or "triton" (runtime.kernels.ema)."""
    t_params, s_params = paired_parameters(teacher, student)
    if kind == "eager":
        return EagerEMA(t_params, s_params)
    if kind == "triton":
        from flashdino.kernels import get_ema_updater

        return get_ema_updater("triton")(t_params, s_params)
    raise ValueError(f"unknown EMA kernel {kind!r}; valid: eager, triton")


# ------------------------------------------------------------------------------------------------
# Sharded EMA under DeepSpeed ZeRO: every rank updates only the shard of the teacher that matches the
# shard of the fp32 master weights its optimizer owns. The teacher's fp32 master shards live here;
# the teacher the forward uses is the model's copy in the compute dtype (bf16 under DeepSpeed bf16).
# ------------------------------------------------------------------------------------------------


def _ema_updater(kind: str, teacher, student):
    if kind == "eager":
        return EagerEMA(teacher, student) if teacher else None
    if kind == "triton":
        from flashdino.kernels import get_ema_updater

        return get_ema_updater("triton")(teacher, student) if teacher else None
    raise ValueError(f"unknown EMA kernel {kind!r}; valid: eager, triton")


def _check_pairs(pairs) -> None:
    for name, t, s in pairs:
        if tuple(t.shape) != tuple(s.shape) and not hasattr(s, "ds_id"):
            raise ValueError(f"teacher/student shape mismatch for '{name}': {tuple(t.shape)} vs {tuple(s.shape)}")


class _ShardedEMA:
    """EMA of this rank's fp32 teacher masters from its student masters, then the teacher weights
    the model computes with are rewritten from the masters (`_write_teacher`, per sharding)."""

    _updater = None

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if self._updater is not None:
            self._updater.update(momentum)
        self._write_teacher()


class ZeroFragmentEMA(_ShardedEMA):
    """ZeRO stages 1 and 2: parameters are whole on every rank, the fp32 master weights are split.

    DeepSpeed gives each rank one contiguous range of every flat parameter group; a parameter's
    piece in that range is its *fragment* (``param._hp_mapping``: where it starts inside the
    parameter, and the fp32 master view). Each rank keeps the teacher's fp32 master for exactly its
    student fragments, updates them from the student's fp32 masters, and one all-gather then
    refreshes the whole compute-dtype teacher on every rank (the same traffic as ZeRO's own
    parameter all-gather).

    `pairs` lists (name, teacher_param, student_param). Student parameters that are frozen (no
    fragment on any rank, so not in the optimizer) have nothing to follow: their teacher stays equal
    to them, as the eager EMA would keep it; their number is ``n_frozen``.
    """

    def __init__(self, pairs, kind: str = "eager", teacher_init=None):
        import torch.distributed as dist

        _check_pairs(pairs)
        self.pairs = pairs
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        own = []  # (pair index, start inside the parameter, numel, student fp32 master view)
        for i, (_, _, s) in enumerate(pairs):
            mapping = getattr(s, "_hp_mapping", None)
            if mapping is not None:
                addr = mapping.lp_fragment_address
                own.append((i, int(addr.start), int(addr.numel), mapping.hp_fragment))
        layouts = [None] * self.world
        dist.all_gather_object(layouts, [(i, start, numel) for i, start, numel, _ in own])
        covered = self._check_tiling(layouts)
        self._layouts = layouts
        self.n_frozen = len(pairs) - len(covered)

        self.student_master = [frag.view(-1) for *_, frag in own]
        self.teacher_master = []
        for (i, start, numel, frag) in own:
            name, t, _ = pairs[i]
            if teacher_init is not None:
                init = teacher_init[name].reshape(-1)[start:start + numel]
            else:
                init = frag.view(-1)  # a fresh run: the teacher is an exact copy of the student (spec 1.7)
            self.teacher_master.append(init.detach().to(device=frag.device, dtype=torch.float32).clone())
        self._updater = _ema_updater(kind, self.teacher_master, self.student_master)

        # All-gather plan: rank r sends its fragments back to back; slot r of the receive buffer is
        # then split along r's layout into views of the teacher parameters.
        dtype = pairs[0][1].dtype
        device = pairs[0][1].device
        lengths = [sum(numel for _, _, numel in layout) for layout in layouts]
        self._slot = max(max(lengths), 1)
        self._send = torch.zeros(self._slot, dtype=dtype, device=device)
        self._recv = torch.empty(self.world * self._slot, dtype=dtype, device=device)
        self._send_views = self._split(self._send, [numel for _, _, numel in layouts[self.rank]])
        self._dst, self._src = [], []
        for r, layout in enumerate(layouts):
            slot = self._recv[r * self._slot:(r + 1) * self._slot]
            for (i, start, numel), src in zip(layout, self._split(slot, [n for _, _, n in layout])):
                self._dst.append(pairs[i][1].data.view(-1)[start:start + numel])
                self._src.append(src)
        self._write_teacher()

    @staticmethod
    def _split(buffer: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
        out, offset = [], 0
        for n in sizes:
            out.append(buffer[offset:offset + n])
            offset += n
        return out

    def _check_tiling(self, layouts) -> set:
        """Every covered parameter's fragments over all ranks tile it exactly once."""
        pieces = {}
        for layout in layouts:
            for i, start, numel in layout:
                pieces.setdefault(i, []).append((start, numel))
        for i, frags in pieces.items():
            name, t, _ = self.pairs[i]
            pos = 0
            for start, numel in sorted(frags):
                if start != pos:
                    raise RuntimeError(f"ZeRO fragments of '{name}' do not tile it (gap/overlap at element {pos}); "
                                       "unsupported DeepSpeed partition layout")
                pos += numel
            if pos != t.numel():
                raise RuntimeError(f"ZeRO fragments of '{name}' cover {pos} of {t.numel()} elements")
        for i, (name, _, s) in enumerate(self.pairs):
            if i not in pieces and s.requires_grad:
                raise RuntimeError(f"trainable student parameter '{name}' has no ZeRO fragment on any rank; "
                                   "is it missing from the optimizer?")
        return set(pieces)

    @torch.no_grad()
    def _write_teacher(self) -> None:
        """Every rank's masters -> the whole compute-dtype teacher on every rank (one all-gather)."""
        import torch.distributed as dist

        if self.teacher_master:
            torch._foreach_copy_(self._send_views, self.teacher_master)
        dist.all_gather_into_tensor(self._recv, self._send)
        if self._dst:
            torch._foreach_copy_(self._dst, self._src)

    @torch.no_grad()
    def full_teacher(self) -> Dict[str, torch.Tensor]:
        """The whole fp32 teacher (name -> tensor) on every rank. Collective."""
        import torch.distributed as dist

        # Frozen pairs have no master: the model copy is their value.
        out = {name: t.detach().float().clone() for name, t, _ in self.pairs}
        send = torch.zeros(self._slot, dtype=torch.float32, device=self._send.device)
        for view, master in zip(self._split(send, [m.numel() for m in self.teacher_master]), self.teacher_master):
            view.copy_(master)
        recv = torch.empty(self.world * self._slot, dtype=torch.float32, device=send.device)
        dist.all_gather_into_tensor(recv, send)
        for r, layout in enumerate(self._layouts):
            slot = recv[r * self._slot:(r + 1) * self._slot]
            for (i, start, numel), src in zip(layout, self._split(slot, [n for _, _, n in layout])):
                out[self.pairs[i][0]].view(-1)[start:start + numel].copy_(src)
        return out


class ZeroPartitionEMA(_ShardedEMA):
    """ZeRO stage 3: every parameter is split into equal partitions, rank r holding elements
    [r*ps, (r+1)*ps) (zero padded at the end). Teacher and student have the same shapes, so their
    partitions line up: each rank updates its teacher partition (fp32 master kept here) from its
    student's fp32 master partition, writes the compute-dtype partition (``param.ds_tensor``) and
    re-gathers the teacher parameters DeepSpeed keeps whole ("persistent" small tensors). No other
    communication: the forward gathers the teacher like any ZeRO-3 module.
    """

    def __init__(self, pairs, kind: str = "eager", teacher_init=None):
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param

        self.pairs = pairs
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.teacher_master, self.student_master, self.teacher_part, self.names = [], [], [], []
        self.n_frozen = 0
        for name, t, s in pairs:
            if not hasattr(t, "ds_tensor") or not hasattr(s, "ds_tensor"):
                raise RuntimeError(f"ZeroPartitionEMA: '{name}' is not a ZeRO-3 partitioned parameter")
            if t.ds_numel != s.ds_numel:
                raise ValueError(f"teacher/student size mismatch for '{name}': {t.ds_numel} vs {s.ds_numel}")
            master = safe_get_local_fp32_param(s) if s.requires_grad else None
            if master is None:
                self.n_frozen += 1  # frozen student parameter: the teacher stays equal to it
                continue
            master = master.view(-1)
            if master.numel() != t.ds_tensor.numel():
                raise RuntimeError(f"ZeRO-3 partitions of '{name}' differ: student {master.numel()}, "
                                   f"teacher {t.ds_tensor.numel()}")
            if teacher_init is not None:
                init = self._my_partition(teacher_init[name].reshape(-1), master.numel())
            else:
                init = master  # a fresh run: the teacher is an exact copy of the student (spec 1.7)
            self.names.append(name)
            self.student_master.append(master)
            self.teacher_master.append(init.detach().to(device=master.device, dtype=torch.float32).clone())
            self.teacher_part.append(t.ds_tensor.data.view(-1))
        self._updater = _ema_updater(kind, self.teacher_master, self.student_master)
        self._plan_persistent_gather([t for _, t, _ in pairs if getattr(t, "ds_persist", False)])
        self._write_teacher()

    def _plan_persistent_gather(self, persistent) -> None:
        """DeepSpeed keeps small parameters whole on every rank ("persistent") and will not re-gather
        a parameter it considers available, so their whole copies are refreshed here: one
        all-gather of all their partitions, then views into each parameter."""
        self._p_send = self._p_recv = None
        self._p_pieces, self._p_parts, self._p_params = [], [], persistent
        if not persistent:
            return
        sizes = [t.ds_tensor.numel() for t in persistent]
        total = sum(sizes)
        t0 = persistent[0]
        self._p_send = torch.empty(total, dtype=t0.ds_tensor.dtype, device=t0.ds_tensor.device)
        self._p_recv = torch.empty(self.world * total, dtype=self._p_send.dtype, device=self._p_send.device)
        self._p_parts = [t.ds_tensor.data.view(-1) for t in persistent]
        self._p_send_views = []
        offset = 0
        for t, size in zip(persistent, sizes):
            self._p_send_views.append(self._p_send[offset:offset + size])
            pieces = []  # (start in the parameter, view of rank r's partition in the receive buffer)
            for r in range(self.world):
                start = r * size
                n = min(size, t.ds_numel - start)
                if n > 0:
                    pieces.append((start, self._p_recv[r * total + offset:r * total + offset + n]))
            self._p_pieces.append(pieces)
            offset += size

    def _refresh_persistent(self) -> None:
        import torch.distributed as dist

        torch._foreach_copy_(self._p_send_views, self._p_parts)
        dist.all_gather_into_tensor(self._p_recv, self._p_send)
        dst, src = [], []
        for t, pieces in zip(self._p_params, self._p_pieces):
            if t.data.numel() != t.ds_numel:  # not gathered right now: DeepSpeed gathers the new partitions
                continue
            flat = t.data.view(-1)
            for start, piece in pieces:
                dst.append(flat[start:start + piece.numel()])
                src.append(piece)
        if dst:
            torch._foreach_copy_(dst, src)

    def _my_partition(self, full: torch.Tensor, size: int) -> torch.Tensor:
        part = torch.zeros(size, dtype=torch.float32)
        start = self.rank * size
        piece = full[start:start + size]
        part[:piece.numel()] = piece.float()
        return part

    @torch.no_grad()
    def _write_teacher(self) -> None:
        if self.teacher_part:
            torch._foreach_copy_(self.teacher_part, self.teacher_master)
        if self._p_send is not None:  # whole on every rank: refresh them from the new partitions
            self._refresh_persistent()

    @torch.no_grad()
    def full_teacher(self) -> Dict[str, torch.Tensor]:
        """The whole fp32 teacher (name -> tensor) on every rank. Collective."""
        import deepspeed
        import torch.distributed as dist

        out = {}
        masters = dict(zip(self.names, self.teacher_master))
        for name, t, _ in self.pairs:
            if name in masters:
                part = masters[name]
                full = torch.empty(self.world * part.numel(), dtype=torch.float32, device=part.device)
                dist.all_gather_into_tensor(full, part)
                out[name] = full[:t.ds_numel].view(t.ds_shape).clone()
            else:
                with deepspeed.zero.GatheredParameters([t]):
                    out[name] = t.detach().float().clone()
        return out

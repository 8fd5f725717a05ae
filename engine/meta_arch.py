"""Student/teacher pair and the per-method forward pass that turns a batch into loss terms.

The four objectives share one structure (spec 2.2, 3.3, 4): the teacher (EMA, no grad, eval mode)
sees the two global crops; the student sees all crops, one backbone call per resolution group, and
one head call on the concatenation. What differs is the head (256-d normalized vs 65536 prototypes),
whether patch tokens enter (v2 methods) and the loss functions.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from . import objectives as O
from .config import ConfigError
from .distributed import all_reduce_sum_, get_world_size
from .models import build_backbone, build_head
from flashdino.profiling.ranges import phase

PATCH_METHODS = ("simdinov2", "dinov2")
PROTOTYPE_METHODS = ("dino", "dinov2")


class SSLMetaArch(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.method = cfg.objective.method
        attention = cfg.runtime.attention
        student_backbone = build_backbone(cfg.model, attention=attention)
        try:
            student_backbone.set_activation_checkpointing(cfg.runtime.activation_checkpointing)
        except ValueError as exc:  # the model knows its depth; the message names the config key
            raise ConfigError(f"runtime.activation_checkpointing={cfg.runtime.activation_checkpointing} blocks, but "
                              f"the student has {len(student_backbone.blocks)} (model.arch={cfg.model.arch})") from exc
        embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": student_backbone, "head": build_head(cfg.head, embed_dim, self.method)})
        teacher_backbone = build_backbone(cfg.model, teacher=True, attention=attention)
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, "head": build_head(cfg.head, embed_dim, self.method)})
        # The teacher starts as an exact copy of the student (spec 1.7).
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if self.method in PROTOTYPE_METHODS and cfg.objective.centering == "centering":
            self.register_buffer("center", torch.zeros(1, cfg.head.n_prototypes))
            if self.method == "dinov2":
                self.register_buffer("patch_center", torch.zeros(1, cfg.head.n_prototypes))
        self.loss_impl = _LossImpl(cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher always runs in eval mode (spec 1.7)
        return self

    # --------------------------------------------------------------------------------------
    def forward(self, batch: Dict[str, torch.Tensor], teacher_temp: float = 0.04) -> Dict[str, torch.Tensor]:
        if self.method == "simdino":
            return self._simdino(batch)
        if self.method == "dino":
            return self._dino(batch, teacher_temp)
        if self.method == "simdinov2":
            return self._simdinov2(batch)
        return self._dinov2(batch, teacher_temp)

    @property
    def n_crops(self) -> int:
        return 2 + self.cfg.crops.n_local

    def _student_cls(self, global_crops, local_crops, masks=None):
        """Backbone once per resolution group (or once, packed); returns (cls of all crops crop-major, global features)."""
        backbone = self.student["backbone"]
        if local_crops is not None and self.cfg.runtime.multicrop == "packed":
            g, local = backbone.forward_features_list([global_crops, local_crops], [masks, None])
            return torch.cat([g["cls"], local["cls"]]), g
        g = backbone.forward_features(global_crops, masks=masks)
        cls = [g["cls"]]
        if local_crops is not None:
            cls.append(backbone.forward_features(local_crops)["cls"])
        return torch.cat(cls), g

    @torch.no_grad()
    def _teacher_features(self, global_crops):
        return self.teacher["backbone"].forward_features(global_crops)

    # --------------------------------------------------------------------------------------
    def _simdino(self, batch):
        with phase("teacher_forward"), torch.no_grad():
            t = self.teacher["head"](self._teacher_features(batch["global_crops"])["cls"])
        with phase("student_forward"):
            s_cls, _ = self._student_cls(batch["global_crops"], batch.get("local_crops"))
            s = self.student["head"](s_cls)
        o = self.cfg.objective
        with phase("loss"):
            loss, comp, expa = self.loss_impl.simdino(s, t, self.n_crops, o)
        self.last_teacher_output = t.detach()
        return {"total_loss": loss, "comp_loss": comp, "expa_loss": expa}

    def _dino(self, batch, teacher_temp):
        o = self.cfg.objective
        with phase("teacher_forward"), torch.no_grad():
            t_logits = self.teacher["head"](self._teacher_features(batch["global_crops"])["cls"])
        with phase("student_forward"):
            s_cls, _ = self._student_cls(batch["global_crops"], batch.get("local_crops"))
            s_logits = self.student["head"](s_cls)
        with phase("loss"):
            if o.centering == "sinkhorn_knopp":
                probs = self.loss_impl.sinkhorn(t_logits.float(), teacher_temp)
                loss = self.loss_impl.dino_cross_entropy(s_logits.float(), probs, self.n_crops, o.student_temp)
            else:
                loss, new_center = self.loss_impl.dino(s_logits, t_logits, self.center, self.n_crops, o, teacher_temp)
                self.center.copy_(new_center)
        self.last_teacher_output = t_logits.detach()
        return {"total_loss": loss, "dino_loss": loss.detach()}

    def _masked_head_inputs(self, batch):
        return batch["mask_indices"], batch["mask_weights"]

    def _simdinov2(self, batch):
        o = self.cfg.objective
        idx, weights = self._masked_head_inputs(batch)
        n_global = batch["global_crops"].shape[0]
        with phase("teacher_forward"), torch.no_grad():
            tf = self._teacher_features(batch["global_crops"])
            t_out = self.teacher["head"](torch.cat([tf["cls"], tf["patch"].flatten(0, 1)[idx]]))
            t_cls, t_patch = t_out[:n_global], t_out[n_global:]
        with phase("student_forward"):
            s_cls_all, g = self._student_cls(batch["global_crops"], batch.get("local_crops"), masks=batch["masks"])
            s_out = self.student["head"](torch.cat([s_cls_all, g["patch"].flatten(0, 1)[idx]]))
        n_cls = s_cls_all.shape[0]
        s_cls, s_patch = s_out[:n_cls], s_out[n_cls:]
        self.last_teacher_output = t_cls.detach()
        with phase("loss"):
            out = O.simdinov2_loss(
                s_cls.float(), t_cls.float(), s_patch.float(), t_patch.float(), weights, self.n_crops,
                eps=o.eps, coeff=o.coeff, expa_type=o.expa_type, world_size=get_world_size(),
                dino_weight=o.dino_weight, ibot_weight=o.ibot_weight, reduce_cov=o.reduce_cov,
                virtual_ranks=o.virtual_ranks, coding_rate_fn=self.loss_impl.coding_rate,
            )
            if o.koleo_weight > 0:  # SimDINOv2 ships with weight 0 (spec 3.1), but the term is in its total (3.6)
                koleo = self._koleo_term(g["cls"], n_global)
                out["total_loss"] = out["total_loss"] + koleo
                out["koleo_loss"] = koleo.detach()
            return out

    def _dinov2(self, batch, teacher_temp):
        o = self.cfg.objective
        idx, weights = self._masked_head_inputs(batch)
        n_global = batch["global_crops"].shape[0]
        with phase("teacher_forward"), torch.no_grad():
            tf = self._teacher_features(batch["global_crops"])
            t_out = self.teacher["head"](torch.cat([tf["cls"], tf["patch"].flatten(0, 1)[idx]])).float()
            t_cls, t_patch = t_out[:n_global], t_out[n_global:]
            if o.centering == "sinkhorn_knopp":
                q_cls = self.loss_impl.sinkhorn(t_cls, teacher_temp)
                q_patch = self.loss_impl.sinkhorn(t_patch, teacher_temp)
            else:
                q_cls = O.softmax_center_teacher(t_cls, self.center, teacher_temp)
                q_patch = O.softmax_center_teacher(t_patch, self.patch_center, teacher_temp)
        with phase("student_forward"):
            s_cls_all, g = self._student_cls(batch["global_crops"], batch.get("local_crops"), masks=batch["masks"])
            s_out = self.student["head"](torch.cat([s_cls_all, g["patch"].flatten(0, 1)[idx]])).float()
        n_cls = s_cls_all.shape[0]
        s_cls, s_patch = s_out[:n_cls], s_out[n_cls:]
        self.last_teacher_output = t_cls.detach()
        with phase("loss"):
            out = self._dinov2_loss_terms(s_cls, s_patch, q_cls, q_patch, g["cls"], weights, n_global)
            self._update_dinov2_centers(t_cls, t_patch)
        return out

    def _dinov2_loss_terms(self, s_cls, s_patch, q_cls, q_patch, student_global_cls, weights, n_global):
        o = self.cfg.objective
        dino = self.loss_impl.dino_cross_entropy(s_cls, q_cls, self.n_crops, o.student_temp)
        ibot = O.ibot_patch_loss(s_patch, q_patch, weights, n_global, o.student_temp)
        total = o.dino_weight * dino + o.ibot_weight * ibot
        out = {"dino_local_crops_loss": dino.detach(), "ibot_loss": ibot.detach()}
        if o.koleo_weight > 0:
            koleo = self._koleo_term(student_global_cls, n_global)
            total = total + koleo
            out["koleo_loss"] = koleo.detach()
        out["total_loss"] = total
        return out

    def _koleo_term(self, student_global_cls, n_global):
        """Weighted KoLeo on the student backbone CLS of each global crop separately, in fp32 (spec 4.2)."""
        b = n_global // 2
        cls_global = student_global_cls.float()
        return self.cfg.objective.koleo_weight * (O.koleo_loss(cls_global[:b]) + O.koleo_loss(cls_global[b:]))

    @torch.no_grad()
    def _update_dinov2_centers(self, t_cls, t_patch):
        o = self.cfg.objective
        if o.centering != "centering":
            return
        self.center.copy_(O.update_center(self.center, t_cls, o.center_momentum))
        # Patch center: mean of each rank's masked rows, averaged over the ranks that have any
        # (spec 4.2). Every rank joins the all-reduce, even with no masked patch, or it would hang.
        # Tensor ops only (no Python number from the masked-patch count): the count changes every
        # batch, and a compiled step must not specialize on it.
        count = t_patch.new_ones(t_patch.shape[0]).sum(0, keepdim=True)
        has_rows = (count > 0).to(t_patch.dtype)
        local_mean = t_patch.sum(0) / count.clamp(min=1.0)
        stats = torch.cat([local_mean, has_rows])
        all_reduce_sum_(stats)
        ranks_with_rows = stats[-1]
        mean = (stats[:-1] / ranks_with_rows.clamp(min=1.0)).reshape(self.patch_center.shape)
        # No masked patch anywhere: keep the old center (branch-free, no host sync).
        m = torch.where(ranks_with_rows > 0, o.center_momentum, 1.0)
        self.patch_center.copy_(m * self.patch_center + (1 - m) * mean)


class _LossImpl:
    """The loss functions of a run: the eager objectives or their Triton kernels (runtime.kernels)."""

    def __init__(self, cfg):
        from flashdino import kernels

        # The trainer resolves "auto" for its device first (runtime/auto.py); a model built straight
        # from an unresolved config (evaluation, export, tests) uses the eager losses.
        k = cfg.runtime.kernels
        coding_rate = "eager" if k.coding_rate == "auto" else k.coding_rate
        centering = "eager" if k.centering == "auto" else k.centering
        self.simdino_loss = kernels.get_simdino_loss(coding_rate)
        self.coding_rate = kernels.get_coding_rate(coding_rate)
        self.dino_loss = kernels.get_dino_centering(centering)
        self.dino_cross_entropy = kernels.get_dino_cross_entropy(centering)
        self.sinkhorn = kernels.get_sinkhorn(centering)

    def simdino(self, s, t, n_crops, o):
        return self.simdino_loss(s.float(), t.float(), n_crops, eps=o.eps, coeff=o.coeff, expa_type=o.expa_type,
                                 world_size=get_world_size(), reduce_cov=o.reduce_cov, virtual_ranks=o.virtual_ranks)

    def dino(self, s_logits, t_logits, center, n_crops, o, teacher_temp):
        return self.dino_loss(s_logits.float(), t_logits.float(), center, n_crops, student_temp=o.student_temp,
                              teacher_temp=teacher_temp, center_momentum=o.center_momentum)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module"):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def teacher_backbone(model: nn.Module) -> nn.Module:
    return unwrap(model).teacher["backbone"]


def student_param_count(model: nn.Module) -> Optional[int]:
    return sum(p.numel() for p in unwrap(model).student.parameters())

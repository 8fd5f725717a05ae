"""Parameter groups, the AdamW optimizer and gradient clipping (spec 1.5, 1.6, trap T8).

Each param group carries ``lr_mult``, ``wd_mult`` and ``is_last_layer``; the trainer writes
``lr = LR * lr_mult`` (or the last-layer LR) and ``weight_decay = WD * wd_mult`` at every step.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "reg_token", "register_tokens")


def v1_param_groups(named_params: Iterable[Tuple[str, nn.Parameter]]) -> List[dict]:
    """v1: no weight decay on biases and 1-D tensors, scheduled WD on everything else."""
    regularized, not_regularized = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append((name, p))
    groups = []
    for members, wd_mult in ((regularized, 1.0), (not_regularized, 0.0)):
        if members:
            groups.append(_group(members, lr_mult=1.0, wd_mult=wd_mult, is_last_layer=False))
    return groups


def backbone_layer_id(name: str, depth: int) -> int:
    """0 for embeddings and tokens, i+1 for block i, depth+1 for everything after the blocks."""
    match = _BLOCK_RE.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(key in name for key in _EMBED_NAMES):
        return 0
    return depth + 1


def v2_param_groups(
    backbone: nn.Module,
    head: nn.Module,
    depth: int,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
) -> List[dict]:
    """v2: per-parameter (lr_mult, wd_mult, is_last_layer), fused by identical multipliers."""
    buckets: Dict[Tuple[float, float, bool], List[Tuple[str, nn.Parameter]]] = {}
    for prefix, module, is_backbone in (("backbone.", backbone, True), ("head.", head, False)):
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            full = prefix + name
            wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
            lr_mult = 1.0
            if is_backbone:
                lr_mult = layerwise_decay ** (depth + 1 - backbone_layer_id(name, depth))
                if "patch_embed" in name:
                    lr_mult *= patch_embed_lr_mult
            key = (lr_mult, wd_mult, "last_layer" in name)
            buckets.setdefault(key, []).append((full, p))
    return [_group(m, lr_mult=k[0], wd_mult=k[1], is_last_layer=k[2]) for k, m in buckets.items()]


def _group(members, lr_mult: float, wd_mult: float, is_last_layer: bool) -> dict:
    return {
        "params": [p for _, p in members],
        "names": [n for n, _ in members],
        "lr_mult": lr_mult,
        "wd_mult": wd_mult,
        "is_last_layer": is_last_layer,
    }


def build_param_groups(cfg, backbone: nn.Module, head: nn.Module) -> List[dict]:
    if cfg.optim.param_groups == "v1":
        named = [("backbone." + n, p) for n, p in backbone.named_parameters()]
        named += [("head." + n, p) for n, p in head.named_parameters()]
        return v1_param_groups(named)
    return v2_param_groups(backbone, head, len(backbone.blocks), cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)


def build_optimizer(cfg, param_groups: List[dict]) -> torch.optim.Optimizer:
    # Names are bookkeeping; torch.optim ignores unknown group keys but keeps them in the state dict.
    o = cfg.optim
    kwargs = dict(lr=0.0, betas=tuple(o.betas), eps=o.adam_eps, weight_decay=0.0)
    # The fused kernel where the parameters live on a GPU; on the CPU (even of a GPU machine) the
    # default implementation, so CPU runs give the same numbers everywhere.
    if all(p.is_cuda for group in param_groups for p in group["params"]):
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups, **kwargs)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Write this iteration's LR and WD into every param group."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer") else lr
        group["lr"] = base * group.get("lr_mult", 1.0)
        group["weight_decay"] = wd * group.get("wd_mult", 1.0)


# ------------------------------------------------------------------------------------------
# Gradient clipping
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_per_parameter(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """v1: each tensor's gradient is scaled by min(1, max_norm / (||g|| + 1e-6)) on its own.

    Returns the per-tensor norms before clipping (stacked), without a host sync.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    return torch.stack(norms)


@torch.no_grad()
def clip_per_module(modules: Sequence[nn.Module], max_norm: float) -> List[torch.Tensor]:
    """v2: global L2 norm computed and clipped separately for each sub-module (backbone, head)."""
    return [torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm) for m in modules]


def drop_last_layer_grads(module: nn.Module) -> None:
    """DINO v1 freezes the prototype layer in the first epoch(s) by dropping its gradients.

    A parameter whose grad is None is skipped by AdamW entirely (no update, no weight decay).
    """
    for name, p in module.named_parameters():
        if "last_layer" in name:
            p.grad = None

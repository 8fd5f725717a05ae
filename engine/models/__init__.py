"""ViT backbones and projection heads, built from the typed config (spec 1.2, 1.3)."""
from __future__ import annotations

from typing import Any, Dict

from .attention import BACKENDS as ATTENTION_BACKENDS
from .attention import scaled_dot_product
from .heads import DINOHead
from .vit import VisionTransformer

# arch -> VisionTransformer size arguments (mlp_ratio 4 for all; ModelConfig.mlp_ratio can change it).
ARCH_SPECS: Dict[str, Dict[str, Any]] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
}

PROTOTYPE_METHODS = ("dino", "dinov2")
METHODS = ("simdino", "simdinov2") + PROTOTYPE_METHODS


def build_backbone(model_cfg, teacher: bool = False, attention: str = "sdpa") -> VisionTransformer:
    """VisionTransformer from a ``flashdino.engine.config.ModelConfig``.

    The teacher gets drop path 0. Non-zero ``embed_dim`` / ``depth`` / ``num_heads`` override the
    arch's values. Style "v2" backbones carry the iBOT mask token."""
    if model_cfg.arch not in ARCH_SPECS:
        raise ValueError(f"unknown arch {model_cfg.arch!r}; valid: {', '.join(ARCH_SPECS)}")
    spec = dict(ARCH_SPECS[model_cfg.arch], mlp_ratio=model_cfg.mlp_ratio)
    for key in ("embed_dim", "depth", "num_heads"):
        value = getattr(model_cfg, key)
        if value:
            spec[key] = value
    return VisionTransformer(
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        in_chans=model_cfg.in_chans,
        qkv_bias=True,
        drop_path_rate=0.0 if teacher else model_cfg.drop_path_rate,
        drop_path_uniform=model_cfg.drop_path_uniform,
        layerscale=model_cfg.layerscale,
        num_register_tokens=model_cfg.num_register_tokens,
        style=model_cfg.style,
        use_mask_token=model_cfg.style == "v2",
        attention=attention,
        **spec,
    )


def build_head(head_cfg, in_dim: int, method: str) -> DINOHead:
    """DINOHead from a ``flashdino.engine.config.HeadConfig``; the prototype layer exists only for
    DINO / DINOv2 (SimDINO and SimDINOv2 output the normalised bottleneck vector)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return DINOHead(
        in_dim,
        hidden_dim=head_cfg.hidden_dim,
        bottleneck_dim=head_cfg.bottleneck_dim,
        nlayers=head_cfg.nlayers,
        n_prototypes=head_cfg.n_prototypes if method in PROTOTYPE_METHODS else 0,
        norm_last_layer=head_cfg.norm_last_layer,
    )


__all__ = [
    "ARCH_SPECS",
    "ATTENTION_BACKENDS",
    "DINOHead",
    "VisionTransformer",
    "build_backbone",
    "build_head",
    "scaled_dot_product",
]

"""Vision Transformer backbones (spec 1.2): DINO-style ("v1") and DINOv2-style ("v2").

| | style "v1" (SimDINO, DINO) | style "v2" (SimDINOv2, DINOv2) |
|---|---|---|
| drop path | per-sample DropPath | batch-subset stochastic depth |
| pos-embed resampling | scale factor with +0.1, no antialias | explicit size, antialias |
| CLS init | trunc-normal std 0.02 | normal std 1e-6 |
| mask token | off by default | on by default |

Registers (any style) come right after CLS and get no position embedding; the token layout is
[CLS, reg x R, patch x P]. Parameter names match timm's VisionTransformer (block names in
:mod:`.layers`), plus ``mask_token`` (1, D) as in DINOv2. One difference from timm's DINOv2
models: our ``pos_embed`` covers CLS + patches (as DINO/DINOv2 store it); timm's ``*_dinov2``
models keep a patch-only ``pos_embed`` and add no position embedding to CLS.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import ensure_backend_available
from .layers import LN_EPS, Block, init_linear_, trunc_normal_init_
from .pos_embed import STYLES, interpolate_pos_embed

TOKEN_INIT_STD_V2 = 1e-6


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with a Conv2d(kernel = stride = patch), PyTorch default init."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid_size(self, x: torch.Tensor):
        """(h, w) patch grid of an image batch; raises a clear error for unusable inputs."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, height, width = x.shape
        if c != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {c} (image shape {tuple(x.shape)})")
        p = self.patch_size
        if height % p or width % p or height == 0 or width == 0:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of the patch size {p}")
        return height // p, width // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major over the grid


class VisionTransformer(nn.Module):
    """ViT backbone. ``forward_features`` gives the final-LayerNorm CLS, patch and register tokens."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        layerscale: float = 0.0,
        num_register_tokens: int = 0,
        style: str = "v1",
        use_mask_token: Optional[bool] = None,
        attention: str = "sdpa",
    ):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown ViT style {style!r}; valid: {', '.join(STYLES)}")
        if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if use_mask_token is None:
            use_mask_token = style == "v2"

        self.style = style
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        grid = img_size // patch_size

        # Registration order = state_dict order = timm's (cls_token, reg_token, pos_embed, patch_embed, ...).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))  # CLS + patches, not registers
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if use_mask_token else None
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)

        if drop_path_uniform:
            rates = [float(drop_path_rate)] * depth
        else:
            # linear 0 -> rate over the blocks (= torch.linspace), in plain Python so meta-device
            # construction works
            rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        drop_mode = "per_sample" if style == "v1" else "batch_subset"
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], drop_mode, layerscale, attention)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.checkpoint_blocks = 0  # see set_activation_checkpointing
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Spec 1.2 init. Patch conv keeps PyTorch's default; LayerNorms 1/0; layerscale its value."""
        trunc_normal_init_(self.pos_embed)
        if self.style == "v1":
            trunc_normal_init_(self.cls_token)
        else:
            nn.init.normal_(self.cls_token, std=TOKEN_INIT_STD_V2)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=TOKEN_INIT_STD_V2)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        self.blocks.apply(init_linear_)

    # ------------------------------------------------------------------ attention backend
    @property
    def attention_backend(self) -> str:
        return self.blocks[0].attn.backend

    def set_attention_backend(self, name: str) -> None:
        """Switch every block's attention backend ("sdpa", "flash", "cudnn", "math", "flash_attn")."""
        ensure_backend_available(name)
        for blk in self.blocks:
            blk.attn.backend = name

    # ------------------------------------------------------------------ activation checkpointing
    def set_activation_checkpointing(self, n_blocks: int) -> None:
        """Recompute the activations of the first `n_blocks` blocks in the backward instead of keeping
        them from the forward (0: none). Only where gradients are recorded; evaluation is unaffected."""
        if not 0 <= n_blocks <= len(self.blocks):
            raise ValueError(f"activation checkpointing of {n_blocks} blocks: this ViT has {len(self.blocks)}")
        self.checkpoint_blocks = int(n_blocks)

    def _run_block(self, index: int, block: Block, *args):
        if index < self.checkpoint_blocks and torch.is_grad_enabled():
            # Non-reentrant: traceable by torch.compile, takes lists (packed crops). It restores the
            # RNG state for the recomputation, so drop path drops the same samples again.
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ------------------------------------------------------------------ tokens
    def prepare_tokens(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, 1 + R + P, D) = [CLS, registers, patches] + pos-embed.

        Masked patches (masks True) get the mask token *instead of* their patch embedding, before
        the position embedding is added."""
        grid_hw = self.patch_embed.grid_size(x)
        patches = self.patch_embed(x)
        b, p, _ = patches.shape
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks were given but this backbone has no mask token (use_mask_token=False)")
            if masks.dtype != torch.bool or tuple(masks.shape) != (b, p):
                raise ValueError(
                    f"masks must be a bool tensor of shape (B, P) = {(b, p)}, got {masks.dtype} {tuple(masks.shape)}"
                )
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        pos = interpolate_pos_embed(self.pos_embed, grid_hw, num_prefix=1, style=self.style)
        tokens = [self.cls_token.expand(b, -1, -1) + pos[:, :1]]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(b, -1, -1))
        tokens.append(patches + pos[:, 1:])
        return torch.cat(tokens, dim=1)

    def _split(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        r = self.num_register_tokens
        return {"cls": x[:, 0], "reg": x[:, 1 : 1 + r], "patch": x[:, 1 + r :]}

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: torch.Tensor, masks: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """dict(cls=(B, D), patch=(B, P, D), reg=(B, R, D)), all after the final LayerNorm."""
        x = self.prepare_tokens(x, masks)
        for i, blk in enumerate(self.blocks):
            x = self._run_block(i, blk, x)
        return self._split(self.norm(x))

    def forward_features_list(
        self, xs: Sequence[torch.Tensor], masks: Optional[Sequence[Optional[torch.Tensor]]] = None
    ) -> List[Dict[str, torch.Tensor]]:
        """:meth:`forward_features` of several crop groups (e.g. global and local crops) at once,
        their token-wise layers packed into one call per layer (DINOv3-style); attention stays per
        group. Same values as one call per group, drop path included (the same random draws)."""
        masks = list(masks) if masks is not None else [None] * len(xs)
        if len(masks) != len(xs):
            raise ValueError(f"forward_features_list: {len(xs)} crop groups but {len(masks)} masks")
        tokens = [self.prepare_tokens(x, m) for x, m in zip(xs, masks)]
        # Stochastic depth is drawn up front, group after group and block after block: the order in
        # which one call per group draws it, so packed and grouped runs drop the same samples.
        draws = [[blk.draw_stochastic_depth(t.shape[0], t.device) for blk in self.blocks] for t in tokens]
        for i, blk in enumerate(self.blocks):
            block_draws = [d[i] for d in draws]
            tokens = self._run_block(i, blk, tokens, None if block_draws[0] is None else block_draws)
        return [self._split(self.norm(t)) for t in tokens]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LayerNorm-ed CLS token (B, D)."""
        return self.forward_features(x)["cls"]

    def get_intermediate_layers(
        self, x: torch.Tensor, n: Union[int, Sequence[int]] = 1, norm: bool = True
    ) -> List[torch.Tensor]:
        """Outputs (B, T, D) of the last `n` blocks (or of the listed block indices), in block order,
        optionally passed through the final LayerNorm (the linear probe uses the last 4 CLS tokens)."""
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n must be in [1, {depth}] for a {depth}-block ViT, got {n}")
            wanted = set(range(depth - n, depth))
        else:
            wanted = set(int(i) for i in n)
            bad = sorted(i for i in wanted if not 0 <= i < depth)
            if bad:
                raise ValueError(f"block indices {bad} out of range for a {depth}-block ViT")
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outputs.append(self.norm(x) if norm else x)
        return outputs

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of the last block, (B, heads, T, T) (explicit math path)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(x))

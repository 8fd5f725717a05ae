"""Transformer building blocks (spec 1.2): attention, MLP, layerscale, the two stochastic-depth
flavours and the pre-norm block.

Module and parameter names follow timm's VisionTransformer (``norm1``, ``attn.qkv``, ``attn.proj``,
``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``) so checkpoints map 1:1.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .attention import attention_probs, ensure_backend_available, scaled_dot_product

LN_EPS = 1e-6
DROP_MODES = ("per_sample", "batch_subset")
INIT_STD = 0.02


def trunc_normal_init_(tensor: torch.Tensor, std: float = INIT_STD) -> torch.Tensor:
    # Cut at +-2 in absolute value (= +-100 sigma), as DINO/DINOv2/timm do: effectively a plain
    # N(0, std^2). Cutting at +-2 sigma would shrink the std by ~12 % (spec 1.2).
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2.0, b=2.0)


def init_linear_(module: nn.Module) -> None:
    """Linear layers: weight trunc-normal std 0.02, bias 0 (spec 1.2 / 1.3)."""
    if isinstance(module, nn.Linear):
        trunc_normal_init_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Per-sample stochastic depth (v1): zero whole samples with probability `rate`, rescale
    the survivors by 1/(1-rate) so the expected value is unchanged."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    # rand < keep rather than bernoulli_(keep): bernoulli_ needs a concrete float, which makes
    # torch.compile specialise on each block's rate (one graph per block, past the recompile limit).
    mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
    return x * mask / keep


_RATE_SCALE = 2 ** 30


def _drop_path_keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """:func:`drop_path` with the keep probability as a 0-d tensor (one compiled graph for any rate)."""
    return _apply_keep(x, torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device), keep)


def _apply_keep(x: torch.Tensor, uniform: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-sample stochastic depth from already drawn uniforms (one per sample, broadcastable)."""
    return x * (uniform < keep) / keep.to(x.dtype)


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path`; every call draws a fresh mask."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def batch_subset_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], rate: float) -> torch.Tensor:
    """x + stochastic-depth(branch(x)) the DINOv2 way (v2): run `branch` only on a random subset of
    floor(b * (1 - rate)) samples (at least one) and add its output back scaled by b / kept.

    Computing the branch on the kept samples only is what saves the compute; the b / kept factor
    keeps the expected residual equal to branch(x)."""
    index = batch_subset_draw(x.shape[0], rate, x.device)
    residual = branch(x[index])
    return torch.index_add(x, 0, index, residual.to(x.dtype), alpha=x.shape[0] / index.shape[0])


def batch_subset_draw(b: int, rate: float, device) -> torch.Tensor:
    """The kept samples of one batch-subset branch: the first floor(b * (1 - rate)) (at least one)
    of a random permutation, drawn as :func:`batch_subset_residual` draws them."""
    return torch.randperm(b, device=device)[:max(int(b * (1.0 - rate)), 1)]


def batch_subset_residual_packed(
    xs: List[torch.Tensor], branch: Callable[[List[torch.Tensor]], List[torch.Tensor]], indices: List[torch.Tensor]
) -> List[torch.Tensor]:
    """:func:`batch_subset_residual` over crop groups whose branch runs packed: group i keeps the
    samples `indices[i]` (see :func:`batch_subset_draw`), and the branch sees the kept samples of
    every group in one call."""
    residuals = branch([x[index] for x, index in zip(xs, indices)])
    return [torch.index_add(x, 0, index, r.to(x.dtype), alpha=x.shape[0] / index.shape[0])
            for x, r, index in zip(xs, residuals, indices)]


def pack_tokens(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token tensors (B_i, T_i, D) of several crop groups as one (sum B_i*T_i, D) matrix."""
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])


def unpack_tokens(flat: torch.Tensor, shapes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """Inverse of :func:`pack_tokens` given each group's (B_i, T_i); the pieces are views."""
    pieces = flat.split([b * t for b, t in shapes])
    return [piece.view(b, t, flat.shape[-1]) for piece, (b, t) in zip(pieces, shapes)]


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (parameter ``gamma``, init `init_value`)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Linear(D -> hidden) -> GELU (exact) -> Linear(hidden -> D)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a switchable backend (see :mod:`.attention`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: str = "sdpa"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.backend = ensure_backend_available(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, qkv: torch.Tensor, b: int, t: int):
        qkv = qkv.reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # each (B, heads, T, head_dim)

    def _qkv(self, x: torch.Tensor):
        b, t, _ = x.shape
        return self._heads(self.qkv(x), b, t)

    def _attend(self, qkv: torch.Tensor, b: int, t: int) -> torch.Tensor:
        q, k, v = self._heads(qkv, b, t)
        out = scaled_dot_product(q, k, v, self.backend, self.scale)
        return out.transpose(1, 2).reshape(b * t, -1)

    def forward(self, x: torch.Tensor, shapes: Optional[Sequence[Tuple[int, int]]] = None) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); or, with `shapes`, packed tokens (sum B_i*T_i, D) of several crop
        groups (see :func:`pack_tokens`): the projections run once over all of them, the
        attention once per group."""
        if shapes is None:
            b, t, d = x.shape
            return self.proj(self._attend(self.qkv(x), b, t)).view(b, t, d)
        chunks = self.qkv(x).split([b * t for b, t in shapes])
        return self.proj(torch.cat([self._attend(c, b, t) for c, (b, t) in zip(chunks, shapes)]))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention probabilities (B, heads, T, T), always via the explicit math path."""
        q, k, _ = self._qkv(x)
        return attention_probs(q, k, self.scale)


class Block(nn.Module):
    """Pre-norm transformer block: x += sd(ls1(attn(norm1(x)))); x += sd(ls2(mlp(norm2(x)))).

    `drop_mode` picks the stochastic depth ``sd``: "per_sample" (v1 DropPath, independent masks for
    the two branches) or "batch_subset" (v2, a fresh random subset per branch). Both act only in
    training mode and only when `drop_path` > 0. `layerscale` 0 disables layerscale (no ``ls`` params).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        drop_mode: str = "per_sample",
        layerscale: float = 0.0,
        attention: str = "sdpa",
    ):
        super().__init__()
        if drop_mode not in DROP_MODES:
            raise ValueError(f"unknown drop_mode {drop_mode!r}; valid: {', '.join(DROP_MODES)}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path rate must be in [0, 1), got {drop_path}")
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, backend=attention)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = float(drop_path)
        self._has_drop_path = self.drop_path > 0.0
        self.drop_mode = drop_mode
        # The per-sample path reads its rate from a buffer, not from the Python float: torch.compile
        # specializes on float attributes, which would give one graph per block (rates rise with
        # depth in v1). An integer buffer (parts per 2**30) is untouched by .half()/.to(bf16).
        self.register_buffer("_drop_rate_fixed", torch.tensor(round(self.drop_path * _RATE_SCALE), dtype=torch.int64),
                             persistent=False)

    def _attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _attn_branch_packed(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        shapes = [tuple(x.shape[:2]) for x in xs]
        return unpack_tokens(self.ls1(self.attn(self.norm1(pack_tokens(xs)), shapes)), shapes)

    def _mlp_branch_packed(self, xs: List[torch.Tensor]) -> List[torch.Tensor]:
        shapes = [tuple(x.shape[:2]) for x in xs]
        return unpack_tokens(self.ls2(self.mlp(self.norm2(pack_tokens(xs)))), shapes)

    def draw_stochastic_depth(self, batch: int, device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The random draws of one forward over `batch` samples, (attention branch, MLP branch), in
        the order and with the calls the unpacked forward makes them; None when it draws nothing.
        Per-sample mode: one uniform per sample; batch-subset mode: the kept sample indices."""
        if not (self.training and self._has_drop_path):
            return None
        if self.drop_mode == "batch_subset":
            return batch_subset_draw(batch, self.drop_path, device), batch_subset_draw(batch, self.drop_path, device)
        return torch.rand((batch, 1, 1), device=device), torch.rand((batch, 1, 1), device=device)

    def _forward_packed(self, xs: List[torch.Tensor], draws: Optional[List]) -> List[torch.Tensor]:
        # The token-wise layers (norms, qkv, proj, MLP) run once over the tokens of every group;
        # attention and the residual (with its per-sample drop path) stay per group.
        if not (self.training and self._has_drop_path):
            xs = [x + r for x, r in zip(xs, self._attn_branch_packed(xs))]
            return [x + r for x, r in zip(xs, self._mlp_branch_packed(xs))]
        if draws is None:
            draws = [self.draw_stochastic_depth(x.shape[0], x.device) for x in xs]
        attn_draws, mlp_draws = [d[0] for d in draws], [d[1] for d in draws]
        if self.drop_mode == "batch_subset":
            xs = batch_subset_residual_packed(xs, self._attn_branch_packed, attn_draws)
            return batch_subset_residual_packed(xs, self._mlp_branch_packed, mlp_draws)
        keep = 1.0 - self._drop_rate_fixed.to(torch.float32) / _RATE_SCALE
        xs = [x + _apply_keep(r, u, keep) for x, r, u in zip(xs, self._attn_branch_packed(xs), attn_draws)]
        return [x + _apply_keep(r, u, keep) for x, r, u in zip(xs, self._mlp_branch_packed(xs), mlp_draws)]

    def forward(self, x, draws: Optional[List] = None):
        """Tokens (B, T, D) -> (B, T, D); a list of several crop groups' tokens runs packed
        (DINOv3-style) and returns the list. `draws` (packed only): per group, the stochastic-depth
        draws of :meth:`draw_stochastic_depth`; drawn here, group after group, when not given."""
        if isinstance(x, (list, tuple)):
            return self._forward_packed(list(x), draws)
        if not (self.training and self._has_drop_path):
            x = x + self._attn_branch(x)
            return x + self._mlp_branch(x)
        if self.drop_mode == "batch_subset":
            # The kept count is a shape, so this path needs the Python rate (v2 rates are uniform).
            x = batch_subset_residual(x, self._attn_branch, self.drop_path)
            return batch_subset_residual(x, self._mlp_branch, self.drop_path)
        keep = 1.0 - self._drop_rate_fixed.to(torch.float32) / _RATE_SCALE
        x = x + _drop_path_keep(self._attn_branch(x), keep)
        return x + _drop_path_keep(self._mlp_branch(x), keep)

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}, drop_mode={self.drop_mode!r}"

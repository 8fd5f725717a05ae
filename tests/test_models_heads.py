"""DINOHead (engine/models/heads.py) against a float64 NumPy head, plus names, init and builders."""
import math

import numpy as np
import pytest
import torch
from scipy.special import erf

from flashdino.engine.config import HeadConfig
from flashdino.engine.models import build_head
from flashdino.engine.models.heads import DINOHead


def _gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def numpy_head(params, x, nlayers, eps=1e-12):
    """MLP (GELU between Linear layers) -> x / max(|x|, eps) -> optional g * v/|v| prototypes."""
    h = np.asarray(x, dtype=np.float64)
    for i in range(nlayers):
        idx = 2 * i
        h = h @ params[f"mlp.{idx}.weight"].T + params[f"mlp.{idx}.bias"]
        if i < nlayers - 1:
            h = _gelu(h)
    z = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), eps)
    if "last_layer.weight_v" not in params:
        return z
    v, g = params["last_layer.weight_v"], params["last_layer.weight_g"]
    w = g * v / np.linalg.norm(v, axis=1, keepdims=True)  # row k: g_k v_k / |v_k|
    return z @ w.T


def _params(head):
    return {k: v.detach().double().numpy() for k, v in head.state_dict().items()}


@pytest.mark.parametrize("n_prototypes", [0, 50])
def test_forward_matches_float64_reference(n_prototypes):
    torch.manual_seed(0)
    head = DINOHead(24, hidden_dim=40, bottleneck_dim=16, nlayers=3, n_prototypes=n_prototypes).double()
    with torch.no_grad():
        for p in head.parameters():  # non-trivial biases and norms g
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(9, 24, dtype=torch.float64)
    out = head(x)
    assert out.shape == (9, n_prototypes or 16) and head.out_dim == (n_prototypes or 16)
    np.testing.assert_allclose(out.detach().numpy(), numpy_head(_params(head), x.numpy(), 3), rtol=1e-10, atol=1e-12)
    if not n_prototypes:
        np.testing.assert_allclose(out.norm(dim=-1).detach().numpy(), 1.0, atol=1e-12)


def test_weight_norm_rows_have_norm_g():
    torch.manual_seed(1)
    head = DINOHead(8, 16, 6, n_prototypes=30, norm_last_layer=False).double()
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    w = head.last_layer.weight().detach().numpy()
    g = head.last_layer.weight_g.detach().numpy()[:, 0]
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), g, rtol=1e-12)
    v = head.last_layer.weight_v.detach().numpy()
    np.testing.assert_allclose(w / g[:, None], v / np.linalg.norm(v, axis=1, keepdims=True), rtol=1e-12)


def test_parameter_names_and_frozen_norm():
    head = DINOHead(32, 64, 16, nlayers=3, n_prototypes=100, norm_last_layer=True)
    shapes = {n: tuple(p.shape) for n, p in head.named_parameters()}
    assert shapes == {
        "mlp.0.weight": (64, 32), "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64), "mlp.2.bias": (64,),
        "mlp.4.weight": (16, 64), "mlp.4.bias": (16,),
        "last_layer.weight_g": (100, 1), "last_layer.weight_v": (100, 16),
    }
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    assert DINOHead(32, 64, 16, n_prototypes=100, norm_last_layer=False).last_layer.weight_g.requires_grad
    # frozen g gets no gradient, v does
    head(torch.randn(4, 32)).sum().backward()
    assert head.last_layer.weight_g.grad is None and head.last_layer.weight_v.grad is not None
    no_proto = DINOHead(32, 64, 16)
    assert not any(n.startswith("last_layer") for n, _ in no_proto.named_parameters())
    assert [n for n, _ in DINOHead(32, nlayers=1).named_parameters()] == ["mlp.weight", "mlp.bias"]


def test_init_statistics():
    torch.manual_seed(2)
    head = DINOHead(384, hidden_dim=512, bottleneck_dim=256, n_prototypes=1000)
    w = torch.cat([head.mlp[i].weight.flatten() for i in (0, 2, 4)])
    assert abs(w.std().item() / 0.02 - 1) < 0.02  # truncation at +-2 absolute: no visible shrink
    assert (w.abs() > 2 * 0.02).float().mean().item() > 0.03  # +-2 sigma cut would leave none
    assert all(torch.count_nonzero(head.mlp[i].bias) == 0 for i in (0, 2, 4))
    assert torch.equal(head.last_layer.weight_g, torch.ones(1000, 1))
    # v keeps nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    v = head.last_layer.weight_v
    bound = 1 / math.sqrt(256)
    assert v.abs().max().item() <= bound and v.abs().max().item() > 0.99 * bound
    assert abs(v.std().item() / (bound / math.sqrt(3)) - 1) < 0.02


def test_accepts_flat_mixed_tokens_and_any_leading_shape():
    torch.manual_seed(3)
    head = DINOHead(16, 32, 8).double()
    cls, patch = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 5, 16, dtype=torch.float64)
    flat = torch.cat([cls, patch.flatten(0, 1)])  # (4 + 20, D): SimDINOv2's shared head input
    out = head(flat)
    torch.testing.assert_close(out[:4], head(cls))
    torch.testing.assert_close(out[4:], head(patch).flatten(0, 1))


def test_fp16_normalisation_eps():
    head = DINOHead(4, 8, 4)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()  # MLP output exactly 0: the eps decides the (finite) result
    z16 = head.half()(torch.ones(2, 4, dtype=torch.float16))
    assert torch.isfinite(z16).all() and torch.count_nonzero(z16) == 0
    from flashdino.engine.models.heads import l2_normalize

    tiny = torch.full((1, 4), 1e-7, dtype=torch.float16)  # norm 2e-7 < 1e-6: divided by the eps
    # (1e-6 itself rounds to 1.013e-6 in fp16, hence the 3 % tolerance; eps 1e-12 would give 0.5)
    torch.testing.assert_close(l2_normalize(tiny).float(), tiny.float() / 1e-6, rtol=3e-2, atol=0)
    tiny32 = torch.full((1, 4), 1e-9)  # fp32: eps 1e-12 leaves it a unit vector
    torch.testing.assert_close(l2_normalize(tiny32), torch.full((1, 4), 0.5))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="last dim 16"):
        DINOHead(16, 32, 8)(torch.randn(3, 12))
    with pytest.raises(ValueError, match="n_prototypes"):
        DINOHead(16, n_prototypes=-1)


@pytest.mark.parametrize("method,protos", [("simdino", 0), ("simdinov2", 0), ("dino", 300), ("dinov2", 300)])
def test_build_head_per_method(method, protos):
    cfg = HeadConfig(hidden_dim=64, bottleneck_dim=32, nlayers=3, n_prototypes=300, norm_last_layer=method == "dino")
    head = build_head(cfg, in_dim=48, method=method)
    assert head.out_dim == (protos or 32)
    assert head(torch.randn(2, 48)).shape == (2, protos or 32)
    if protos:
        assert head.last_layer.weight_g.requires_grad == (method == "dinov2")


def test_build_head_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'ibot'"):
        build_head(HeadConfig(), 48, "ibot")

"""Stochastic depth (v1 per-sample DropPath, v2 batch-subset) and the transformer block."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from flashdino.engine.models.layers import Block, DropPath, LayerScale, batch_subset_residual, drop_path


class Const(nn.Module):
    """Stand-in branch that outputs a fixed vector for every token, so the block output reveals
    which samples each branch was applied to."""

    def __init__(self, vec):
        super().__init__()
        self.register_buffer("vec", vec)

    def forward(self, x):
        return self.vec.expand_as(x).clone()


def _probe_block(drop_mode, rate, dim=4):
    blk = Block(dim, 1, drop_path=rate, drop_mode=drop_mode)
    blk.attn = Const(torch.tensor([1.0, 0, 0, 0]))  # attention branch writes channel 0
    blk.mlp = Const(torch.tensor([0, 1.0, 0, 0]))  # MLP branch writes channel 1
    return blk


def _binomial_ok(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# ------------------------------------------------------------------ v1 per-sample DropPath
def test_drop_path_statistics():
    torch.manual_seed(0)
    rate, n = 0.3, 20000
    x = torch.ones(n, 3, 2)
    y = drop_path(x, rate, training=True)
    per_sample = y[:, 0, 0]
    assert torch.equal(y, per_sample[:, None, None].expand_as(y)), "the whole sample is kept or dropped"
    kept = per_sample != 0
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / (1 - rate)))
    assert _binomial_ok(int(kept.sum()), n, 1 - rate)
    # expected value preserved: mean of n iid draws with std sqrt(rate/(1-rate))
    assert abs(per_sample.mean().item() - 1.0) < 5 * math.sqrt(rate / (1 - rate) / n)


def test_drop_path_eval_and_zero_rate_are_identity():
    x = torch.randn(8, 5, 3)
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    m = DropPath(0.5).eval()
    assert m(x) is x


def test_drop_path_module_draws_fresh_masks():
    torch.manual_seed(1)
    m = DropPath(0.5).train()
    x = torch.ones(512, 1)
    assert not torch.equal(m(x), m(x))


# ------------------------------------------------------------------ v2 batch-subset stochastic depth
@pytest.mark.parametrize("b,rate", [(10, 0.2), (64, 0.3), (3, 0.9), (7, 0.05)])
def test_batch_subset_keeps_floor_and_rescales(b, rate):
    torch.manual_seed(b)
    x = torch.randn(b, 4, 6)
    seen = []

    def branch(t):
        seen.append(t.shape[0])
        return 2.0 * t + 1.0

    out = batch_subset_residual(x, branch, rate)
    kept = max(math.floor(b * (1 - rate)), 1)
    assert seen == [kept], "the branch runs on the kept samples only"
    changed = ~torch.isclose(out, x).all(dim=(1, 2))
    assert int(changed.sum()) == kept
    expected = x[changed] + (b / kept) * (2.0 * x[changed] + 1.0)
    torch.testing.assert_close(out[changed], expected)
    torch.testing.assert_close(out[~changed], x[~changed], rtol=0, atol=0)


def test_batch_subset_expected_value_and_uniform_inclusion():
    torch.manual_seed(2)
    b, rate, trials = 10, 0.25, 4000
    x = torch.zeros(b, 1, 1)
    total = torch.zeros(b)
    hits = torch.zeros(b)
    for _ in range(trials):
        out = batch_subset_residual(x, lambda t: t + 1.0, rate).view(b)  # undropped residual: 1
        total += out
        hits += out != 0
    kept = math.floor(b * (1 - rate))  # 7
    # each sample is included with probability kept / b; the b/kept factor makes E[residual] = 1
    for i in range(b):
        assert _binomial_ok(hits[i].item(), trials, kept / b)
    p = kept / b
    sd = (b / kept) * math.sqrt(p * (1 - p) / trials)
    assert (total / trials - 1.0).abs().max().item() < 5 * sd


def test_batch_subset_gradients_reach_only_kept_samples():
    torch.manual_seed(3)
    x = torch.randn(8, 2, 3, requires_grad=True)
    w = torch.tensor(3.0, requires_grad=True)
    out = batch_subset_residual(x, lambda t: w * t, 0.5)
    out.sum().backward()
    g = x.grad[:, 0, 0]
    # identity path gives 1; kept samples additionally get w * b / kept = 3 * 2
    assert sorted(g.tolist()) == [1.0] * 4 + [7.0] * 4
    kept = g == 7.0
    torch.testing.assert_close(w.grad, 2.0 * x.detach()[kept].sum())


# ------------------------------------------------------------------ block-level draws
@pytest.mark.parametrize("drop_mode", ["per_sample", "batch_subset"])
def test_block_draws_independently_per_branch_and_preserves_mean(drop_mode):
    torch.manual_seed(4)
    rate, n = 0.4, 4000
    blk = _probe_block(drop_mode, rate).train()
    x = torch.zeros(n, 1, 4)
    d = blk(x)[:, 0]
    a, m = d[:, 0], d[:, 1]
    a_on, m_on = a != 0, m != 0
    if drop_mode == "per_sample":
        scale = 1 / (1 - rate)
        assert _binomial_ok(int(a_on.sum()), n, 1 - rate) and _binomial_ok(int(m_on.sum()), n, 1 - rate)
    else:
        kept = math.floor(n * (1 - rate))
        scale = n / kept
        assert int(a_on.sum()) == kept and int(m_on.sum()) == kept
    torch.testing.assert_close(a[a_on], torch.full_like(a[a_on], scale))
    torch.testing.assert_close(m[m_on], torch.full_like(m[m_on], scale))
    # independent draws: the two masks differ and co-occur like independent coins
    assert not torch.equal(a_on, m_on)
    assert _binomial_ok(int((a_on & m_on).sum()), n, (1 - rate) ** 2, sigmas=6)
    # expected residual of each branch is the undropped one (1.0)
    assert abs(a.mean().item() - 1.0) < 0.06 and abs(m.mean().item() - 1.0) < 0.06


@pytest.mark.parametrize("drop_mode", ["per_sample", "batch_subset"])
def test_block_eval_mode_has_no_drop(drop_mode):
    blk = _probe_block(drop_mode, 0.5).eval()
    out = blk(torch.zeros(64, 3, 4))
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 0, 0]).expand(64, 3, 4), rtol=0, atol=0)


def test_layerscale_scales_branches_and_is_named_gamma():
    blk = Block(8, 2, layerscale=0.1)
    names = [n for n, _ in blk.named_parameters()]
    assert "ls1.gamma" in names and "ls2.gamma" in names
    torch.testing.assert_close(blk.ls1.gamma.detach(), torch.full((8,), 0.1))
    assert isinstance(Block(8, 2, layerscale=0.0).ls1, nn.Identity)
    ls = LayerScale(3, 0.5)
    torch.testing.assert_close(ls(torch.ones(2, 3)), torch.full((2, 3), 0.5))


def _np_layernorm(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def test_block_forward_matches_float64_reference():
    torch.manual_seed(5)
    dim, heads, ls = 12, 3, 0.1
    blk = Block(dim, heads, mlp_ratio=2.0, layerscale=ls).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm / layerscale parameters
        for p in (blk.norm1.weight, blk.norm1.bias, blk.norm2.weight, blk.norm2.bias, blk.ls1.gamma, blk.ls2.gamma):
            p.add_(0.3 * torch.randn_like(p))
    P = {k: v.detach().numpy() for k, v in blk.state_dict().items()}
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    h = x.numpy()
    y = _np_layernorm(h, P["norm1.weight"], P["norm1.bias"])
    qkv = (y @ P["attn.qkv.weight"].T + P["attn.qkv.bias"]).reshape(2, 5, 3, heads, dim // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    s = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(dim // heads)
    pr = np.exp(s - s.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    o = np.einsum("bhij,bhjd->bhid", pr, v).transpose(0, 2, 1, 3).reshape(2, 5, dim)
    h = h + P["ls1.gamma"] * (o @ P["attn.proj.weight"].T + P["attn.proj.bias"])
    y = _np_layernorm(h, P["norm2.weight"], P["norm2.bias"])
    y = _np_gelu(y @ P["mlp.fc1.weight"].T + P["mlp.fc1.bias"]) @ P["mlp.fc2.weight"].T + P["mlp.fc2.bias"]
    h = h + P["ls2.gamma"] * y
    np.testing.assert_allclose(blk(x).detach().numpy(), h, rtol=1e-10, atol=1e-12)


def test_block_rejects_bad_arguments():
    with pytest.raises(ValueError, match="drop_mode"):
        Block(8, 2, drop_mode="row")
    with pytest.raises(ValueError, match="drop_path rate"):
        Block(8, 2, drop_path=1.0)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        Block(10, 3)

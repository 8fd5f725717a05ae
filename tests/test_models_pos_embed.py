"""Position-embedding interpolation (engine/models/pos_embed.py) against independent float64
NumPy bicubic resamplers and against F.interpolate with the spec's arguments."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashdino.engine.models.pos_embed import interpolate_pos_embed


def _cubic(x, a):
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def plain_bicubic_weights(n_in, n_out, ratio):
    """Keys cubic convolution (a = -0.75), half-pixel centres, source step `ratio`, edge clamping."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * ratio - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k in range(-1, 3):
            w[i, min(max(x0 + k, 0), n_in - 1)] += _cubic(k - t, -0.75)
    return w


def antialias_bicubic_weights(n_in, n_out):
    """PIL-style separable resampling: cubic a = -0.5 stretched by the downscale factor, normalised."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        c = scale * (i + 0.5)
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
        row = np.array([_cubic((j - c + 0.5) / stretch, -0.5) for j in range(lo, hi)])
        w[i, lo:hi] = row / row.sum()
    return w


def numpy_reference(pos, h, w, style):
    """(1, 1 + M*M, D) float64 array -> (1, 1 + h*w, D) with the spec's v1 / v2 conventions."""
    m = int(round(math.sqrt(pos.shape[1] - 1)))
    grid = pos[0, 1:].reshape(m, m, -1)
    if style == "v1":
        wh, ww = plain_bicubic_weights(m, h, m / (h + 0.1)), plain_bicubic_weights(m, w, m / (w + 0.1))
    else:
        wh, ww = antialias_bicubic_weights(m, h), antialias_bicubic_weights(m, w)
    out = np.einsum("hi,ijd,wj->hwd", wh, grid, ww).reshape(1, h * w, -1)
    return np.concatenate([pos[:, :1], out], axis=1)


def _pos(m, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1 + m * m, dim, generator=g, dtype=torch.float64)


# 14 -> 6 is the 96 px local crop of a /16 ViT; the rest cover up-sampling and non-square grids.
CASES = [(14, 6, 6), (14, 32, 32), (14, 14, 7), (7, 3, 12), (7, 5, 5)]


@pytest.mark.parametrize("style", ["v1", "v2"])
@pytest.mark.parametrize("m,h,w", CASES)
def test_matches_independent_numpy_bicubic(style, m, h, w):
    pos = _pos(m, seed=m * 100 + h * 10 + w)
    out = interpolate_pos_embed(pos, (h, w), style=style)
    assert out.shape == (1, 1 + h * w, pos.shape[-1])
    # The resampling runs in fp32 inside (parameters are fp32 in training).
    np.testing.assert_allclose(out.numpy(), numpy_reference(pos.numpy(), h, w, style), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,h,w", CASES)
def test_matches_f_interpolate_with_spec_arguments(m, h, w):
    pos = _pos(m, seed=7).float()
    grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    v1 = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
    v2 = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    for style, ref in (("v1", v1), ("v2", v2)):
        ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, h * w, -1)], dim=1)
        torch.testing.assert_close(interpolate_pos_embed(pos, (h, w), style=style), ref, rtol=0, atol=0)


def test_styles_really_differ_for_local_crops():
    # The +0.1 offset and the antialias filter both move the result; the test above would not
    # notice a swapped style if the two conventions happened to agree.
    pos = _pos(14).float()
    v1 = interpolate_pos_embed(pos, (6, 6), style="v1")
    v2 = interpolate_pos_embed(pos, (6, 6), style="v2")
    no_offset = numpy_reference(pos.double().numpy(), 6, 6, "v2")  # antialias, no offset
    assert (v1 - v2).abs().max() > 1e-2
    assert np.abs(v1.double().numpy() - no_offset).max() > 1e-2


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_identity_at_native_size_and_cls_untouched(style):
    pos = _pos(14).float().requires_grad_()
    assert interpolate_pos_embed(pos, (14, 14), style=style) is pos
    out = interpolate_pos_embed(pos, (6, 6), style=style)
    torch.testing.assert_close(out[:, 0], pos[:, 0], rtol=0, atol=0)
    out.sum().backward()  # differentiable w.r.t. the parameter (it trains)
    assert pos.grad is not None and torch.isfinite(pos.grad).all()


def test_half_precision_parameter_keeps_its_dtype():
    pos = _pos(14).to(torch.bfloat16)
    out = interpolate_pos_embed(pos, (6, 6), style="v2")
    assert out.dtype == torch.bfloat16
    ref = numpy_reference(pos.double().numpy(), 6, 6, "v2")
    np.testing.assert_allclose(out.double().numpy(), ref, atol=3e-2, rtol=3e-2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 15, 4), (3, 3))
    with pytest.raises(ValueError, match="unknown pos-embed style 'v3'"):
        interpolate_pos_embed(_pos(4), (2, 2), style="v3")
    with pytest.raises(ValueError, match="patch grid must be positive"):
        interpolate_pos_embed(_pos(4), (0, 2))

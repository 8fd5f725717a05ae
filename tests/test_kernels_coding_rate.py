"""Fused coding rate and SimDINO loss against float64 computations of spec 2.3-2.5 (and the eager objectives)."""
import numpy as np
import pytest
import torch

import flashdino.kernels._common as kcommon
from flashdino.kernels import get_coding_rate, get_simdino_loss
from flashdino.kernels.coding_rate import coding_rate_fused, simdino_loss_fused
from flashdino.kernels.testing import assert_close64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_OUTPUTS", True)


def rate64(z, alpha):
    """Independent float64: ½ log det(I_p + α ZᵀZ) on the full p×p covariance, and α Z (I + α ZᵀZ)⁻¹."""
    z = np.asarray(z, np.float64)
    p = z.shape[-1]
    m = np.eye(p) + alpha * z.T @ z
    sign, logdet = np.linalg.slogdet(m)
    assert sign > 0
    grad = alpha * np.linalg.solve(m, z.T).T  # M symmetric: Z M⁻¹ = (M⁻¹ Zᵀ)ᵀ
    return 0.5 * logdet, grad


def _unit_rows(gen, *shape):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _check_rates(z, eps, world_size, rates, grad, what):
    """Value: relative error ≤ 1e-5 (fp32 inputs, issue #5). Gradient: every element within
    max(1e-5, 4·cond(M)·u) of the largest gradient entry — applying M⁻¹ in fp32 has a
    backward error of O(cond(M)·u) whatever the method (LAPACK's Cholesky included); cond(M) ≤ 1 + α·B."""
    b, p = z.shape[-2:]
    alpha = p / (b * world_size * eps)
    zs = z.detach().double().cpu().numpy().reshape(-1, b, p)
    refs = [rate64(zg, alpha) for zg in zs]
    r_ref = np.array([r for r, _ in refs]).reshape(rates.shape)
    assert_close64(rates, r_ref, np.abs(r_ref) + 1e-3, ulps=1e-5 / 2.0 ** -23, what=f"{what} rate",
                   dtype=torch.float32)
    if grad is not None:
        g_ref = np.stack([g for _, g in refs]).reshape(grad.shape)
        cond = max(np.linalg.cond(np.eye(p) + alpha * zg.T @ zg) for zg in zs)
        assert_close64(grad, g_ref, np.abs(g_ref).max(), ulps=max(1e-5 / 2.0 ** -23, 4 * cond),
                       what=f"{what} gradient", dtype=torch.float32)


@pytest.mark.parametrize("shape", [(8, 20), (2, 40, 24), (2, 64, 256), (1, 100, 130)],
                         ids=["gram-2d", "covariance", "gram-64x256", "gram-pad128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_rate_and_gradient_match_float64(shape, dtype):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    z = _unit_rows(gen, *shape).to(dtype).requires_grad_()
    rates = coding_rate_fused(z, eps=0.05)
    assert rates.shape == shape[:-2] and rates.dtype == torch.float32
    rates.sum().backward()
    assert z.grad.dtype == dtype
    # fp16 input: the reference sees the same fp16 values; the kernel computes in fp32 — the
    # gradient is rounded back to fp16, so its bound is the fp16 rounding of the largest entry.
    _check_rates(z, 0.05, 1, rates, z.grad.float() if dtype == torch.float32 else None, f"{dtype} {shape}")
    if dtype == torch.float16:
        _, g = rate64(z.detach().double().numpy().reshape(-1, *shape[-2:])[0], shape[-1] / (shape[-2] * 0.05))
        got = z.grad.double().numpy().reshape(-1, *shape[-2:])[0]
        assert_close64(torch.from_numpy(got), g, np.abs(g).max(), ulps=2, what="fp16 gradient", dtype=torch.float16)


@pytest.mark.parametrize("case", ["duplicated-rows", "zero-rows", "all-zero", "rank-one", "b-less-than-p"])
@pytest.mark.parametrize("path", ["triton", "linalg"])
def test_rank_deficient_inputs_give_no_nan(case, path):
    gen = torch.Generator().manual_seed(17)
    z = _unit_rows(gen, 2, 24, 32)
    if case == "duplicated-rows":
        z[:, 12:] = z[:, :12]
    elif case == "zero-rows":
        z[:, ::3] = 0
    elif case == "all-zero":
        z.zero_()
    elif case == "rank-one":
        z[:] = z[:, :1]
    z = z.float().requires_grad_()
    rates = coding_rate_fused(z, eps=0.05, max_triton_n=128 if path == "triton" else 0)
    rates.sum().backward()
    assert torch.isfinite(rates).all() and torch.isfinite(z.grad).all()
    _check_rates(z, 0.05, 1, rates, z.grad, f"{path} {case}")
    if case == "all-zero":
        assert torch.equal(rates, torch.zeros(2)) and not z.grad.any()


@pytest.mark.parametrize("shape", [(2, 12, 40), (2, 48, 16)], ids=["gram", "covariance"])
def test_linalg_fallback_and_float64_match(shape):
    gen = torch.Generator().manual_seed(2)
    z = _unit_rows(gen, *shape).float().requires_grad_()
    rates = coding_rate_fused(z, eps=0.5, world_size=4, max_triton_n=0)  # force cuSOLVER's path
    rates.sum().backward()
    _check_rates(z, 0.5, 4, rates, z.grad, f"linalg {shape}")
    z64 = z.detach().double().requires_grad_()
    r64 = coding_rate_fused(z64, eps=0.5, world_size=4)
    assert r64.dtype == torch.float64
    r64.sum().backward()
    ref = [rate64(zg, shape[-1] / (shape[-2] * 4 * 0.5)) for zg in z64.detach().numpy()]
    assert np.allclose(r64.detach().numpy(), [r for r, _ in ref], rtol=1e-12, atol=0)
    assert np.allclose(z64.grad.numpy(), np.stack([g for _, g in ref]), rtol=1e-10, atol=1e-13)


def test_nan_features_give_nan_rate_and_debug_raises():
    z = torch.randn(2, 8, 20)
    z[1, 3, 4] = float("nan")
    rates = coding_rate_fused(z, eps=0.05)
    assert torch.isfinite(rates[0]) and torch.isnan(rates[1])
    with pytest.raises(FloatingPointError, match=r"view\(s\) \[1\]"):
        coding_rate_fused(z, eps=0.05, debug=True)


def test_matches_eager_objective():
    gen = torch.Generator().manual_seed(5)
    z = _unit_rows(gen, 2, 16, 48).float()
    eager = get_coding_rate("eager")(z, 0.05, 2)
    fused = get_coding_rate("triton")(z, 0.05, 2)
    assert torch.allclose(fused, eager, rtol=2e-6, atol=0)
    assert get_coding_rate("triton")(z[0], 0.05).shape == ()


def test_coding_rate_rejects_bad_input():
    with pytest.raises(ValueError, match="'eps' must be > 0"):
        coding_rate_fused(torch.zeros(4, 8), eps=0.0)
    with pytest.raises(ValueError, match=r"\(B, p\) or \(G, B, p\)"):
        coding_rate_fused(torch.zeros(1, 2, 4, 8), eps=0.1)
    with pytest.raises(TypeError, match="floating-point"):
        coding_rate_fused(torch.zeros(4, 8, dtype=torch.long), eps=0.1)
    with pytest.raises(ValueError, match="world_size=2 was passed"):
        coding_rate_fused(torch.zeros(4, 8), eps=0.1, world_size=2, reduce_cov=True)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        get_coding_rate("fast")


# ------------------------------------------------------------------------------------ SimDINO loss

def simdino64(s, t, n_views, eps, coeff, expa_type, world_size, virtual_ranks):
    """Independent float64 torch implementation of spec 2.3-2.5 with a pair loop (autograd for the gradient)."""
    b = s.shape[0] // n_views
    p = s.shape[1]
    sv, tv = s.view(n_views, b, p), t.view(2, b, p)

    def cos(x, y):
        return (x * y).sum(-1) / (x.norm(dim=-1).clamp_min(1e-8) * y.norm(dim=-1).clamp_min(1e-8))

    comp = sum(cos(tv[g], sv[v]).mean() for g in range(2) for v in range(n_views) if v != g) / (2 * n_views - 2)
    k = virtual_ranks
    bk = b // k
    alpha = p / (b * world_size * eps)  # = p / (bk · (N·k) · eps)
    rates = []
    for g in range(2):
        z = sv[g] if expa_type == 0 else (sv[g] + tv[g]) / 2
        for j in range(k):
            zj = z[j * bk:(j + 1) * bk]
            rates.append(0.5 * torch.logdet(torch.eye(p, dtype=torch.float64) + alpha * zj.T @ zj))
    rows = b * world_size
    expa = (p + rows) / (p * rows) * torch.stack(rates).mean()
    return -coeff * comp - expa, comp, expa


SIMDINO_CASES = [
    dict(),
    dict(expa_type=0, eps=0.5),
    dict(world_size=8, coeff=0.7),
    dict(virtual_ranks=2, world_size=2),
]


@pytest.mark.parametrize("kw", SIMDINO_CASES, ids=["default", "type0", "world8", "virtual2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_simdino_loss_matches_float64(kw, dtype):
    gen = torch.Generator().manual_seed(31)
    n_views, b, p = 5, 6, 40
    s = _unit_rows(gen, n_views * b, p)
    s[7] *= 0.5          # not unit norm: the cosine divides by the norm
    if dtype == torch.float32:
        s[n_views * b - 1] = 0  # zero row: the norm clamp (1e-8) path (its ~1e6 gradient overflows fp16)
    t = _unit_rows(gen, 2 * b, p)
    s_in = s.to(dtype).requires_grad_()
    t_in = t.to(dtype)
    out = simdino_loss_fused(s_in, t_in, n_views, **kw)
    out[0].backward()
    full = dict(eps=0.05, coeff=1.0, expa_type=1, world_size=1, virtual_ranks=1) | kw
    s64 = s_in.detach().double().requires_grad_()
    ref = simdino64(s64, t_in.double(), n_views, full["eps"], full["coeff"], full["expa_type"], full["world_size"],
                    full["virtual_ranks"])
    ref[0].backward()
    for name, a, r in zip(("loss", "comp", "expa"), out, ref):
        assert a.dtype == torch.float32 and a.shape == ()
        assert_close64(a, r.detach(), abs(float(r.detach())) + 1e-6, ulps=1e-5 / 2.0 ** -23, what=f"{name} {kw}",
                       dtype=torch.float32)
    g_ref = s64.grad
    ulps, gdt = (1e-5 / 2.0 ** -23, torch.float32) if dtype == torch.float32 else (2, torch.float16)
    assert_close64(s_in.grad, g_ref, g_ref.abs().max(), ulps=ulps, what=f"gradient {kw}", dtype=gdt)


def test_simdino_spec_vectors():
    """Spec §8 inputs A (hand-checkable values)."""
    s = torch.tensor([[1, 0], [0, 1], [0.6, 0.8], [1, 0], [0, 1], [-1, 0]], dtype=torch.float32)
    t = torch.tensor([[1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1]], dtype=torch.float32)
    expected = [(dict(expa_type=0, eps=0.5), 1.0550239418819152), (dict(expa_type=0, eps=0.5, world_size=8),
                0.12347852611696278), (dict(expa_type=0, eps=0.05), 2.9456942535623867),
                (dict(expa_type=1, eps=0.5), 0.8651682771143161), (dict(expa_type=1, eps=0.05), 2.3288507108057965)]
    for kw, expa in expected:
        loss, comp, ex = simdino_loss_fused(s, t, 3, **kw)
        assert abs(float(comp) - 0.375) < 1e-6
        assert abs(float(ex) - expa) <= 1e-5 * expa
        assert abs(float(loss) - (-0.375 - expa)) <= 1e-5 * (0.375 + expa)


def test_simdino_matches_eager_objective_and_registry():
    gen = torch.Generator().manual_seed(4)
    s = _unit_rows(gen, 4 * 8, 24).float()
    t = _unit_rows(gen, 2 * 8, 24).float()
    eager = get_simdino_loss("eager")(s, t, 4, eps=0.05, world_size=2, virtual_ranks=2)
    fused = get_simdino_loss("triton")(s, t, 4, eps=0.05, world_size=2, virtual_ranks=2)
    for a, b in zip(fused, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # reduce_cov on one process: no virtual split, the covariance of the whole local batch.
    eager = get_simdino_loss("eager")(s, t, 4, eps=0.05, reduce_cov=True, virtual_ranks=2)
    fused = get_simdino_loss("triton")(s, t, 4, eps=0.05, reduce_cov=True, virtual_ranks=2)
    for a, b in zip(fused, eager):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_simdino_rejects_bad_input():
    s, t = torch.zeros(12, 8), torch.zeros(6, 8)
    with pytest.raises(ValueError, match="n_crops"):
        simdino_loss_fused(s, t, 1)
    with pytest.raises(ValueError, match="teacher shape"):
        simdino_loss_fused(s, torch.zeros(4, 8), 4)
    with pytest.raises(ValueError, match="virtual_ranks"):
        simdino_loss_fused(s, t, 4, virtual_ranks=2)
    with pytest.raises(ValueError, match="expa_type"):
        simdino_loss_fused(s, t, 4, expa_type=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_coding_rate_gpu(dtype):
    gen = torch.Generator().manual_seed(9)
    z = _unit_rows(gen, 2, 64, 256).to("cuda", dtype).requires_grad_()
    rates = coding_rate_fused(z, eps=0.05)
    rates.sum().backward()
    _check_rates(z, 0.05, 1, rates, z.grad.float() if dtype == torch.float32 else None, f"gpu {dtype}")


@pytest.mark.parametrize("max_n", [128, 0], ids=["triton", "linalg"])
def test_autocast_does_not_lower_precision(max_n):
    """Spec T1: the coding rate is fp32 whatever autocast is active around it."""
    gen = torch.Generator().manual_seed(13)
    z = _unit_rows(gen, 2, 16, 40).float()
    plain = coding_rate_fused(z, eps=0.05, max_triton_n=max_n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = coding_rate_fused(z, eps=0.05, max_triton_n=max_n)
    assert under.dtype == torch.float32 and torch.equal(under, plain)

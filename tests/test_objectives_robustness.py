"""Precision policy (autocast, fp16/bf16 inputs), failure handling (T2) and input validation."""
import math

import pytest
import torch

from flashdino.engine.objectives import (
    coding_rate,
    cosine_patch_loss,
    dino_cross_entropy,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    simdino_loss,
    simdinov2_loss,
    sinkhorn_knopp,
    softmax_center_teacher,
    update_center,
)


def features(seed, n_crops=4, batch=6, dim=16):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, dim, generator=g)
    s = base + 0.8 * torch.randn(n_crops, batch, dim, generator=g)
    t = base + 0.5 * torch.randn(2, batch, dim, generator=g)
    s = s / s.norm(dim=-1, keepdim=True)
    t = t / t.norm(dim=-1, keepdim=True)
    return s.reshape(-1, dim), t.reshape(-1, dim)


def all_objectives(seed):
    """Every objective on one set of fp32 inputs, as a dict of tensors."""
    s, t = features(seed)
    g = torch.Generator().manual_seed(seed + 1)
    logits_s = torch.randn(24, 10, generator=g)
    logits_t = torch.randn(12, 10, generator=g)
    center = torch.randn(10, generator=g) * 0.1
    sp, tp = s[:5], t[:5]
    w = torch.rand(5, generator=g)
    out = {
        "simdino": torch.stack(simdino_loss(s, t, 4, eps=0.05)),
        "simdino_N4_k2": torch.stack(simdino_loss(s, t, 4, eps=0.05, world_size=4, virtual_ranks=2)),
        "coding_rate": coding_rate(s.view(4, 6, 16), 0.05),
        "coding_rate_cov": coding_rate(s.view(2, 12, 16)[:, :, :8], 0.05),
        "dino": dino_loss(logits_s, logits_t, center, 4)[0],
        "ibot": ibot_patch_loss(logits_s[:5], torch.softmax(logits_t[:5], -1), w, 12),
        "sinkhorn": sinkhorn_knopp(logits_t, 0.04),
        "koleo": koleo_loss(logits_s),
        "patch": cosine_patch_loss(sp, tp, w, 12),
    }
    out.update({f"v2_{k}": v for k, v in simdinov2_loss(s, t, sp, tp, w, 4).items()})
    return out


def test_cpu_autocast_is_really_active():
    """Guard for the next test: CPU autocast must lower matmuls, or that test could not fail."""
    x = torch.randn(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_does_not_change_results(amp_dtype):
    plain = all_objectives(0)
    with torch.autocast("cpu", dtype=amp_dtype):
        amp = all_objectives(0)
    for key, value in plain.items():
        assert amp[key].dtype == torch.float32, key
        torch.testing.assert_close(amp[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(low):
    s, t = features(1)
    s_low = s.to(low).requires_grad_()
    t_low = t.to(low)
    loss, comp, expa = simdino_loss(s_low, t_low, 4, eps=0.05)
    ref = simdino_loss(s_low.detach().float(), t_low.float(), 4, eps=0.05)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(torch.stack([loss, comp, expa]), torch.stack(ref), rtol=1e-6, atol=1e-7)
    loss.backward()
    assert s_low.grad.dtype == low and torch.isfinite(s_low.grad.float()).all()
    torch.testing.assert_close(koleo_loss(s_low.detach()), koleo_loss(s_low.detach().float()))
    assert koleo_loss(s_low.detach()).dtype == torch.float32


# --------------------------------------------------------------------------------------
# Failure policy (T2) and degenerate inputs
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("batch,dim", [(4, 8), (8, 4)])
def test_non_finite_features_give_nan_not_garbage(bad, batch, dim):
    z = torch.randn(2, batch, dim)
    z[1, 2, 3] = bad
    rates = coding_rate(z, 0.05)
    assert torch.isfinite(rates[0]) and torch.isnan(rates[1])
    with pytest.raises(FloatingPointError, match=r"Cholesky .* failed for view\(s\) \[1\]"):
        coding_rate(z, 0.05, debug=True)


def test_debug_env_var(monkeypatch):
    z = torch.randn(4, 8)
    z[0, 0] = float("nan")
    monkeypatch.setenv("FLASHDINO_DEBUG", "1")
    with pytest.raises(FloatingPointError):
        coding_rate(z, 0.05)
    assert torch.isnan(coding_rate(z, 0.05, debug=False))
    s, t = features(2)
    s[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        simdino_loss(s, t, 4)
    monkeypatch.setenv("FLASHDINO_DEBUG", "0")
    assert torch.isnan(simdino_loss(s, t, 4)[0])


@pytest.mark.parametrize("batch,dim", [(3, 8), (8, 3)])
def test_all_zero_features(batch, dim):
    z = torch.zeros(batch, dim, requires_grad=True)
    rate = coding_rate(z, 0.05)
    rate.backward()
    assert rate.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))
    # Zero student rows: cosine 0 through the 1e-8 clamp, finite loss and gradient.
    s = torch.zeros(3 * batch, dim, requires_grad=True)
    loss, comp, expa = simdino_loss(s, torch.ones(2 * batch, dim), 3, expa_type=1)
    loss.backward()
    assert comp.item() == 0.0 and torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_teacher_gets_no_gradient():
    s, t = features(3)
    s.requires_grad_()
    t.requires_grad_()
    out = simdinov2_loss(s, t, s[:4], t[:4], torch.ones(4), 4)
    out["total_loss"].backward()
    assert t.grad is None and s.grad is not None
    a = torch.randn(8, 5, requires_grad=True)
    u = torch.randn(4, 5, requires_grad=True)
    dino_loss(a, u, torch.zeros(5), 4)[0].backward()
    ibot_patch_loss(a[:4], torch.softmax(u, -1), torch.ones(4), 4).backward()
    assert u.grad is None and a.grad is not None


def test_koleo_never_picks_itself():
    # Two antipodal points: the reference's -1 diagonal fill ties with the true neighbour.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(koleo_loss(x), torch.tensor(-math.log(2.0), dtype=torch.float64), rtol=1e-7, atol=0)


def test_sinkhorn_empty_and_single_row():
    assert sinkhorn_knopp(torch.zeros(0, 5), 0.1).shape == (0, 5)
    q = sinkhorn_knopp(torch.randn(1, 5), 0.04)
    torch.testing.assert_close(q.sum(-1), torch.ones(1))


# --------------------------------------------------------------------------------------
# Input validation: clear errors naming the thing that is wrong
# --------------------------------------------------------------------------------------

S, T = features(4)  # student (24, 16) = 4 crops x 6, teacher (12, 16)
BAD_CALLS = [
    (lambda: coding_rate(torch.randn(2, 3, 4, 5), 0.1), ValueError, "'z' must be"),
    (lambda: coding_rate(torch.randn(4, 5), 0.0), ValueError, "'eps' must be > 0"),
    (lambda: coding_rate(torch.randn(4, 5), 0.1, world_size=0), ValueError, "'world_size'"),
    (lambda: coding_rate(torch.ones(4, 5, dtype=torch.long), 0.1), TypeError, "floating-point"),
    (lambda: coding_rate(torch.randn(4, 5), 0.1, world_size=2, reduce_cov=True), ValueError, "process group"),
    (lambda: simdino_loss(S, T, 5), ValueError, "not a multiple of n_crops=5"),
    (lambda: simdino_loss(S, T, 3), ValueError, "'teacher' has 12 rows but 'student' implies B=8"),
    (lambda: simdino_loss(S, T[:, :8], 4), ValueError, "'student' dim 16 != 'teacher' dim 8"),
    (lambda: simdino_loss(S, T, 1), ValueError, "'n_crops' must be an int >= 2"),
    (lambda: simdino_loss(S, T, 4, expa_type=2), ValueError, "'expa_type' must be 0 or 1"),
    (lambda: simdino_loss(S, T, 4, virtual_ranks=4), ValueError, "'virtual_ranks'=4 .* divides the batch B=6"),
    (lambda: simdino_loss(S.view(4, 6, 16), T, 4), ValueError, "'student' must be 2-D"),
    (lambda: cosine_patch_loss(S[:3], T[:4], torch.ones(3), 4), ValueError, "same shape"),
    (lambda: cosine_patch_loss(S[:3], T[:3], torch.ones(2), 4), ValueError, "one weight per masked patch"),
    (lambda: cosine_patch_loss(S[:3], T[:3], torch.ones(3), 0), ValueError, "'n_global_crops'"),
    (lambda: dino_cross_entropy(S, T, 4, student_temp=0), ValueError, "'student_temp'"),
    (lambda: dino_cross_entropy(S, T[:6], 4), ValueError, "'teacher_probs' has 6 rows"),
    (lambda: simdinov2_loss(S, T[:6], S[:2], T[:2], torch.ones(2), 4), ValueError, "'teacher_cls' has 6 rows"),
    (lambda: softmax_center_teacher(T, torch.zeros(3), 0.04), ValueError, "'center' must have shape"),
    (lambda: update_center(torch.zeros(16), T, momentum=1.5), ValueError, "'momentum'"),
    (lambda: ibot_patch_loss(S[:3], T[:3, :5], torch.ones(3), 4), ValueError, "same shape"),
    (lambda: sinkhorn_knopp(T, 0.04, n_iterations=0), ValueError, "'n_iterations'"),
    (lambda: sinkhorn_knopp(T, -1.0), ValueError, "'teacher_temp'"),
    (lambda: koleo_loss(torch.randn(1, 4)), ValueError, "at least 2 rows"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_cuda_under_autocast_matches_cpu(amp_dtype):
    """On a GPU under autocast (TF32 off by conftest), every objective equals its CPU fp32 value."""
    cpu = all_objectives(5)

    def on_cuda(seed):
        s, t = features(seed)
        return s.cuda(), t.cuda()

    s, t = on_cuda(5)
    with torch.autocast("cuda", dtype=amp_dtype):
        got = torch.stack(simdino_loss(s.half(), t.half(), 4, eps=0.05))
        rate = coding_rate(s.view(4, 6, 16), 0.05)
        rate_cov = coding_rate(s.view(2, 12, 16)[:, :, :8], 0.05)
    ref = torch.stack(simdino_loss(s.half().float().cpu(), t.half().float().cpu(), 4, eps=0.05))
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rate.cpu(), cpu["coding_rate"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rate_cov.cpu(), cpu["coding_rate_cov"], rtol=1e-5, atol=1e-6)

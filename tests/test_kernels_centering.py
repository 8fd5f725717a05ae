"""Fused DINO centering + cross-entropy and Sinkhorn-Knopp against float64 computations of spec 4.1 / 4.2."""
import numpy as np
import pytest
import torch

import flashdino.kernels._common as kcommon
from flashdino.kernels import get_dino_centering, get_dino_cross_entropy, get_sinkhorn
from flashdino.kernels.centering import dino_cross_entropy_fused, dino_loss_fused, sinkhorn_knopp_fused
from flashdino.kernels.testing import assert_close64, unit_roundoff

TINY = 1e-37  # values below fp32's smallest normal (1.2e-38) are subnormal: absolute precision only
TINY16 = 2.0 ** -24  # fp16's subnormal spacing: gradients below it round to 0 when stored as fp16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kcommon, "POISON_OUTPUTS", True)


def dino64(a, q, n_views, tau_s):
    """Independent float64 spec 4.1 with a pair loop: mean over v ≠ g of the batch-mean CE."""
    b = a.shape[0] // n_views
    logp = torch.log_softmax(a / tau_s, dim=-1).view(n_views, b, -1)
    qv = q.view(2, b, -1)
    terms = [-(qv[g] * logp[v]).sum(-1).mean() for g in range(2) for v in range(n_views) if v != g]
    return sum(terms) / (2 * n_views - 2)


def _grad_scale(a, x_t, q, n_views, tau_s):
    """Per-element magnitude of the fp32 rounding in ∂L/∂a: exp() turns an absolute argument error
    of u·|arg| into a relative one, for p = softmax(a/τ_s) and q = softmax(x_t)."""
    b = a.shape[0] // n_views
    y = a / tau_s
    lse = torch.logsumexp(y, -1, keepdim=True)
    p = torch.exp(y - lse).view(n_views, b, -1)
    term_p = (p * ((y.abs() + lse.abs()).view(n_views, b, -1) + 4))
    qv = q.view(2, b, -1)
    arg_q = (x_t.abs() + torch.logsumexp(x_t, -1, keepdim=True).abs()).view(2, b, -1) + 4
    term_q = qv * arg_q
    out = torch.empty_like(p)
    for v in range(n_views):
        pair = [g for g in range(2) if g != v]
        out[v] = len(pair) * term_p[v] + sum(term_q[g] for g in pair)
    return out.view_as(a) / (tau_s * (2 * n_views - 2) * b)


CASES = [(4, 3, 300, 0.04), (12, 2, 1000, 0.07), (3, 5, 17, 0.04)]


@pytest.mark.parametrize("n_views,batch,n_protos,tau_t", CASES, ids=["V4-K300", "V12-K1000", "V3-K17"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dino_loss_matches_float64(n_views, batch, n_protos, tau_t, dtype):
    gen = torch.Generator().manual_seed(n_protos + n_views)
    a = (2 * torch.randn(n_views * batch, n_protos, generator=gen, dtype=torch.float64)).to(dtype)
    u = torch.randn(2 * batch, n_protos, generator=gen, dtype=torch.float64).to(dtype)
    center = 0.2 * torch.randn(n_protos, generator=gen)
    a_in = a.clone().requires_grad_()
    loss, new_center = dino_loss_fused(a_in, u, center, n_views, 0.1, tau_t, 0.9)
    loss.backward()

    a64 = a.double().requires_grad_()
    x_t = (u.double() - center.double()) / tau_t
    q = torch.softmax(x_t, -1)
    ref = dino64(a64, q, n_views, 0.1)
    ref.backward()
    y_max = float((a.double() / 0.1).abs().max() + x_t.abs().max())
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close64(loss, ref.detach(), abs(float(ref.detach())) + y_max, ulps=16, what="loss", dtype=torch.float32)
    scale = _grad_scale(a.double(), x_t, q, n_views, 0.1)
    atol = (unit_roundoff(dtype) * a64.grad.abs()).numpy() + TINY16 if dtype != torch.float32 else TINY
    assert a_in.grad.dtype == dtype
    assert_close64(a_in.grad, a64.grad, scale, ulps=8, what="gradient", dtype=torch.float32, atol=atol)
    center_ref = 0.9 * center.double() + 0.1 * u.double().mean(0)
    assert new_center.shape == center.shape and new_center.dtype == torch.float32
    assert_close64(new_center, center_ref, center.double().abs() + u.double().abs().max(0).values, ulps=4 * batch,
                   what="new center", dtype=torch.float32)


def test_dino_spec_vector():
    """Spec §8 DINO CE example: K = 3, B = 2, V = 3, τ_s = 0.1, c = (0.05, −0.05, 0)."""
    a = torch.tensor([[0.5, 0.1, -0.2], [0, 0.3, 0.2], [0.1, 0.4, -0.1], [0.2, -0.2, 0.1], [-0.3, 0.2, 0.6],
                      [0.05, 0.05, 0]])
    u = torch.tensor([[0.4, 0, -0.1], [0.1, 0.2, 0.3], [0, 0.5, 0.1], [0.3, -0.1, 0]])
    c = torch.tensor([[0.05, -0.05, 0.0]])
    for tau_t, expected in ((0.04, 3.4683483384543927), (0.07, 3.472462710659295)):
        loss, new_c = dino_loss_fused(a, u, c, 3, 0.1, tau_t, 0.9)
        assert abs(float(loss) - expected) <= 2e-6 * expected
        assert new_c.shape == (1, 3)
        assert torch.allclose(new_c, torch.tensor([[0.065, -0.03, 0.0075]]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dino_cross_entropy_with_given_probs(dtype):
    gen = torch.Generator().manual_seed(3)
    n_views, batch, n_protos = 5, 3, 290
    a = (3 * torch.randn(n_views * batch, n_protos, generator=gen, dtype=torch.float64)).to(dtype)
    # Targets that do not sum to exactly 1 (as a Sinkhorn output in fp32): CE = lse·Σq − ⟨q, y⟩.
    q = torch.softmax(torch.randn(2 * batch, n_protos, generator=gen, dtype=torch.float64) / 0.1, -1) * 1.01
    a_in = a.clone().requires_grad_()
    loss = dino_cross_entropy_fused(a_in, q.float(), n_views, 0.1)
    loss.backward()
    a64 = a.double().requires_grad_()
    ref = dino64(a64, q.float().double(), n_views, 0.1)
    ref.backward()
    y_max = float((a.double() / 0.1).abs().max())
    assert_close64(loss, ref.detach(), abs(float(ref.detach())) + y_max, ulps=16, what="CE loss", dtype=torch.float32)
    scale = _grad_scale(a.double(), torch.log(q), q, n_views, 0.1)
    atol = (unit_roundoff(dtype) * a64.grad.abs()).numpy() + TINY16 if dtype != torch.float32 else TINY
    assert_close64(a_in.grad, a64.grad, scale, ulps=8, what="CE gradient", dtype=torch.float32, atol=atol)


def test_fused_matches_eager_objectives_and_registry():
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(4 * 2, 260, generator=gen)
    u = torch.randn(2 * 2, 260, generator=gen)
    c = torch.zeros(260)
    eager_loss, eager_c = get_dino_centering("eager")(a, u, c, 4)
    fused_loss, fused_c = get_dino_centering("triton")(a, u, c, 4)
    assert torch.allclose(fused_loss, eager_loss, rtol=1e-5) and torch.allclose(fused_c, eager_c, atol=1e-7)
    q = get_sinkhorn("eager")(u, 0.05)
    assert torch.allclose(get_sinkhorn("triton")(u, 0.05), q, rtol=5e-5, atol=1e-9)
    assert torch.allclose(get_dino_cross_entropy("triton")(a, q, 4), get_dino_cross_entropy("eager")(a, q, 4),
                          rtol=1e-5)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        get_dino_centering("cuda")


def test_no_gradient_needed_and_upstream_scale():
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(3 * 2, 40, generator=gen).requires_grad_()
    u = torch.randn(4, 40, generator=gen)
    loss, _ = dino_loss_fused(a, u, torch.zeros(40), 3)
    (2.5 * loss).backward()
    g = a.grad.clone()
    a.grad = None
    dino_loss_fused(a, u, torch.zeros(40), 3)[0].backward()
    assert torch.allclose(g, 2.5 * a.grad, rtol=1e-6, atol=0)
    with torch.no_grad():
        assert torch.isfinite(dino_loss_fused(a, u, torch.zeros(40), 3)[0])


def test_dino_rejects_bad_input():
    a, u = torch.zeros(6, 10), torch.zeros(4, 10)
    with pytest.raises(ValueError, match="n_crops"):
        dino_loss_fused(a, u, torch.zeros(10), 1)
    with pytest.raises(ValueError, match="'teacher_logits' has shape"):
        dino_loss_fused(a, torch.zeros(6, 10), torch.zeros(10), 3)
    with pytest.raises(ValueError, match="'center' must have shape"):
        dino_loss_fused(a, u, torch.zeros(9), 3)
    with pytest.raises(ValueError, match="temperatures"):
        dino_loss_fused(a, u, torch.zeros(10), 3, teacher_temp=0.0)
    with pytest.raises(ValueError, match="student_temp"):
        dino_cross_entropy_fused(a, u, 3, student_temp=-1.0)


# ------------------------------------------------------------------------------------ Sinkhorn

def sinkhorn64(u, tau, n_iter):
    """Independent float64 NumPy transcription of spec 4.2 (one rank, no shift)."""
    q = np.exp(np.asarray(u, np.float64) / tau).T
    n_protos, n_rows = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(axis=1, keepdims=True)
        q /= n_protos
        q /= q.sum(axis=0, keepdims=True)
        q /= n_rows
    return (q * n_rows).T


@pytest.mark.parametrize("n_rows,n_protos,n_iter", [(37, 700, 3), (5, 300, 1), (20, 33, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sinkhorn_matches_float64(n_rows, n_protos, n_iter, dtype):
    gen = torch.Generator().manual_seed(n_rows * n_protos)
    u = torch.randn(n_rows, n_protos, generator=gen).to(dtype)
    tau = 0.05
    probs = sinkhorn_knopp_fused(u, tau, n_iter)
    assert probs.shape == (n_rows, n_protos) and probs.dtype == torch.float32
    ref = sinkhorn64(u.double().numpy(), tau, n_iter)
    x = u.double().numpy() / tau
    # exp() of an argument |x − m_k| carries a relative error ≈ u·|x − m_k|.
    arg = np.abs(x - x.max(axis=0, keepdims=True)) + 16 * (n_iter + 1)
    assert_close64(probs, ref, ref * arg, ulps=4, atol=TINY, what=f"sinkhorn {n_iter} it", dtype=torch.float32)
    assert np.allclose(probs.double().sum(1).numpy(), 1.0, atol=1e-5)


def test_sinkhorn_spec_vector_and_overflow_guard():
    u = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.1, 0.0, 0.7], [0.2, 0.6, 0.1]])
    expected = torch.tensor([[0.96981633, 0.02599452, 0.00418916], [0.81302783, 0.16102252, 0.02594965],
                             [0.00007067, 0.00207714, 0.99785220], [0.00022850, 0.99682919, 0.00294231]])
    assert torch.allclose(sinkhorn_knopp_fused(u, 0.1, 3), expected, rtol=1e-5, atol=5e-9)
    # Logits / τ beyond fp32's exp range (88.7), and a sample far below every prototype maximum
    # (its whole column would underflow): the shifts keep every value finite and equal to the
    # float64 result of the unshifted formula (float64 has the range for it).
    big = 10.0 * u
    big[3] -= 30.0
    probs = sinkhorn_knopp_fused(big, 0.1, 3)
    assert torch.isfinite(probs).all()
    ref = sinkhorn64(big.double().numpy(), 0.1, 3)
    assert np.isfinite(ref).all()
    assert np.allclose(probs.numpy(), ref, rtol=1e-4, atol=1e-30)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp_fused(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp_fused(torch.zeros(2, 3), 0.1, 0)
    with pytest.raises(ValueError, match="2-D"):
        sinkhorn_knopp_fused(torch.zeros(3), 0.1)


@pytest.mark.gpu
def test_dino_loss_bf16_gpu():
    gen = torch.Generator().manual_seed(1)
    n_views, batch, n_protos = 12, 8, 65536
    a = torch.randn(n_views * batch, n_protos, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    u = torch.randn(2 * batch, n_protos, generator=gen).to("cuda", torch.bfloat16)
    c = torch.zeros(n_protos, device="cuda")
    loss, _ = dino_loss_fused(a, u, c, n_views)
    loss.backward()
    a64 = a.detach().double().requires_grad_()
    ref = dino64(a64, torch.softmax((u.double() - c.double()) / 0.04, -1), n_views, 0.1)
    ref.backward()
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref)) + 1e-4
    assert torch.allclose(a.grad.double(), a64.grad, rtol=2e-2, atol=1e-3 * float(a64.grad.abs().max()))


def test_float64_inputs_use_the_eager_objectives():
    """float64 is a reference precision: the fused ops hand it to the eager objectives unchanged."""
    from flashdino.engine import objectives

    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3 * 2, 30, generator=gen, dtype=torch.float64)
    u = torch.randn(2 * 2, 30, generator=gen, dtype=torch.float64)
    c = torch.zeros(30, dtype=torch.float64)
    got, want = dino_loss_fused(a, u, c, 3), objectives.dino_loss(a, u, c, 3)
    assert got[0].dtype == torch.float64 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    q = torch.softmax(u, -1)
    assert torch.equal(dino_cross_entropy_fused(a, q, 3), objectives.dino_cross_entropy(a, q, 3))
    assert torch.equal(sinkhorn_knopp_fused(u, 0.05), objectives.sinkhorn_knopp(u, 0.05))


def test_temperatures_as_0d_tensors_and_no_prototype_columns():
    """The eager ops take 0-d tensor temperatures; so must the fused ones (Triton needs scalars).
    No prototype at all is an error, not a NaN loss."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    a = torch.randn(6, 40, generator=gen)
    u = torch.randn(4, 40, generator=gen)
    center = torch.zeros(40)
    loss, _ = dino_loss_fused(a, u, center, 3, torch.tensor(0.1), torch.tensor(0.04), 0.9)
    ref = dino64(a.double(), torch.softmax(u.double() / 0.04, -1), 3, 0.1)
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))
    q = torch.softmax(u, -1)
    ce = dino_cross_entropy_fused(a, q, 3, torch.tensor(0.1))
    assert abs(float(ce) - float(dino64(a.double(), q.double(), 3, 0.1))) <= 1e-5 * abs(float(ce))
    with pytest.raises(ValueError, match="no prototype column"):
        dino_loss_fused(torch.zeros(6, 0), torch.zeros(4, 0), torch.zeros(0), 3)
    with pytest.raises(ValueError, match="no prototype column"):
        dino_cross_entropy_fused(torch.zeros(6, 0), torch.zeros(4, 0), 3)

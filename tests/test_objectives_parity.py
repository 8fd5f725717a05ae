"""Parity of every objective against independent float64 NumPy loops of the spec formulas.

Fresh random inputs each run: the seed is printed (pytest -s, or shown on failure) and can be
pinned with FLASHDINO_TEST_SEED=<int> to reproduce a failure.
fp32 results must match the float64 reference to a relative error of 1e-5.
"""
import os

import numpy as np
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

RTOL_FP32 = 1e-5


@pytest.fixture
def gen(request):
    seed = int(os.environ.get("FLASHDINO_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[seed] {request.node.name}: FLASHDINO_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def rel_err(actual, expected):
    """max |a - e| / max |e| (norm-wise relative error, robust to individual near-zero entries)."""
    actual = np.asarray(torch.as_tensor(actual).detach().double().numpy(), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def assert_rel(actual, expected, gen, tol=RTOL_FP32, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol} (seed {gen.initial_seed()})"


# --------------------------------------------------------------------------------------
# Independent float64 NumPy references (explicit loops over pairs / views / groups)
# --------------------------------------------------------------------------------------

def np_cos(x, y):
    return float(x @ y) / (max(np.linalg.norm(x), 1e-8) * max(np.linalg.norm(y), 1e-8))


def np_half_logdet_cov(z, alpha):
    """1/2 log det(I_p + alpha Z^T Z), always through the p x p covariance."""
    p = z.shape[1]
    sign, logdet = np.linalg.slogdet(np.eye(p) + alpha * (z.T @ z))
    assert sign > 0
    return 0.5 * logdet


def np_simdino(student, teacher, n_crops, eps, coeff, expa_type, world_size, virtual_ranks=1):
    s = np.asarray(student, np.float64)
    t = np.asarray(teacher, np.float64)
    n_views, p = n_crops, s.shape[1]
    batch = s.shape[0] // n_views
    s = s.reshape(n_views, batch, p)
    t = t.reshape(2, batch, p)
    total, n_pairs = 0.0, 0
    for g in range(2):
        for v in range(n_views):
            if v == g:
                continue
            total += np.mean([np_cos(t[g, b], s[v, b]) for b in range(batch)])
            n_pairs += 1
    assert n_pairs == 2 * n_views - 2
    comp = total / n_pairs
    k = virtual_ranks
    b = batch // k
    ranks = world_size * k
    alpha = p / (b * ranks * eps)
    gamma = (p + ranks * b) / (p * ranks * b)
    group_expa = []
    for j in range(k):
        rates = []
        for g in range(2):
            rows = slice(j * b, (j + 1) * b)
            z = s[g, rows] if expa_type == 0 else (s[g, rows] + t[g, rows]) / 2
            rates.append(np_half_logdet_cov(z, alpha))
        group_expa.append(gamma * (rates[0] + rates[1]) / 2)
    expa = float(np.mean(group_expa))
    return -coeff * comp - expa, comp, expa


def np_log_softmax(x):
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def np_dino(student_logits, teacher_logits, center, n_crops, student_temp, teacher_temp, momentum):
    a = np.asarray(student_logits, np.float64)
    u = np.asarray(teacher_logits, np.float64)
    c = np.asarray(center, np.float64).reshape(-1)
    batch = u.shape[0] // 2
    total, n_pairs = 0.0, 0
    for g in range(2):
        for v in range(n_crops):
            if v == g:
                continue
            ce = 0.0
            for b in range(batch):
                q = np.exp(np_log_softmax((u[g * batch + b] - c) / teacher_temp))
                ce += -np.sum(q * np_log_softmax(a[v * batch + b] / student_temp))
            total += ce / batch
            n_pairs += 1
    new_center = momentum * c + (1 - momentum) * u.mean(axis=0)
    return total / n_pairs, new_center


def np_sinkhorn(u, temp, n_iterations):
    """The spec's recipe literally: exp without any shift, in float64."""
    q = np.exp(np.asarray(u, np.float64) / temp).T
    n_protos, n_rows = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= n_protos
        q /= q.sum(axis=0, keepdims=True)
        q /= n_rows
    return (q * n_rows).T


def np_koleo(x):
    x = np.asarray(x, np.float64)
    xh = np.stack([r / max(np.linalg.norm(r), 1e-8) for r in x])
    out = 0.0
    for i in range(len(xh)):
        best, best_j = -np.inf, -1
        for j in range(len(xh)):
            if j != i and xh[i] @ xh[j] > best:
                best, best_j = xh[i] @ xh[j], j
        out += np.log(np.linalg.norm(xh[i] - xh[best_j] + 1e-8) + 1e-8)
    return -out / len(xh)


def np_patch_ce(a, q, w, n_global_crops, temp):
    total = 0.0
    for j in range(len(w)):
        total += w[j] * -np.sum(np.asarray(q[j], np.float64) * np_log_softmax(np.asarray(a[j], np.float64) / temp))
    return total / n_global_crops


def np_cos_patch(s, t, w, n_global_crops):
    return -sum(w[j] * np_cos(np.asarray(t[j], np.float64), np.asarray(s[j], np.float64)) for j in range(len(w))) / n_global_crops


# --------------------------------------------------------------------------------------
# Input generators
# --------------------------------------------------------------------------------------

def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def crop_features(gen, n_crops, batch, dim, dtype=torch.float32, shared_base=False):
    """Correlated unit features (so cosines, and comp, are far from 0), crop-major student and teacher.

    shared_base: every image shares one base direction (used with rank-one students, so that their
    single row per view still correlates with every teacher row).
    """
    base = torch.randn(1 if shared_base else batch, dim, generator=gen, dtype=torch.float64)
    student = unit(base + 0.8 * torch.randn(n_crops, batch, dim, generator=gen, dtype=torch.float64))
    teacher = unit(base + 0.5 * torch.randn(2, batch, dim, generator=gen, dtype=torch.float64))
    return student.reshape(-1, dim).to(dtype), teacher.reshape(-1, dim).to(dtype)


def make_rank_deficient(student, n_crops, batch, kind):
    s = student.view(n_crops, batch, -1).clone()
    if kind == "duplicated_rows":
        s[:, 1] = s[:, 0]
        s[:, 3] = s[:, 0]
    elif kind == "zero_rows":
        s[:, 2] = 0
    elif kind == "rank_one":
        s[:] = s[:, :1]
    return s.reshape(-1, s.shape[-1])


# --------------------------------------------------------------------------------------
# SimDINO loss
# --------------------------------------------------------------------------------------

CASES = [
    # (batch, dim, n_crops, expa_type, eps, world_size, virtual_ranks)
    (6, 16, 4, 0, 0.5, 1, 1),  # B < p: Gram form
    (6, 16, 4, 1, 0.05, 1, 1),
    (24, 8, 3, 0, 0.05, 1, 1),  # B > p: covariance form
    (24, 8, 3, 1, 0.5, 8, 1),  # world size enters alpha and gamma
    (8, 8, 2, 1, 0.2, 2, 1),  # B == p, only the two global crops
    (12, 10, 4, 0, 0.05, 1, 3),  # virtual ranks: groups of 4 rows, 4 < p
    (24, 6, 3, 1, 0.5, 2, 2),  # virtual ranks with world size, groups of 12 > p
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_p{}_V{}_t{}_eps{}_N{}_k{}".format(*c))
def test_simdino_matches_numpy(case, gen):
    batch, dim, n_crops, expa_type, eps, world_size, k = case
    student, teacher = crop_features(gen, n_crops, batch, dim)
    loss, comp, expa = simdino_loss(student, teacher, n_crops, eps=eps, coeff=0.7, expa_type=expa_type,
                                    world_size=world_size, virtual_ranks=k)
    ref = np_simdino(student.double().numpy(), teacher.double().numpy(), n_crops, eps, 0.7, expa_type, world_size, k)
    assert loss.dtype == torch.float32
    for name, got, want in zip(("loss", "comp", "expa"), (loss, comp, expa), ref):
        assert_rel(got, want, gen, what=name)


@pytest.mark.parametrize("kind", ["duplicated_rows", "zero_rows", "rank_one"])
@pytest.mark.parametrize("batch,dim", [(6, 16), (20, 6)])
@pytest.mark.parametrize("expa_type", [0, 1])
def test_simdino_rank_deficient(kind, batch, dim, expa_type, gen):
    n_crops = 3
    student, teacher = crop_features(gen, n_crops, batch, dim, shared_base=kind == "rank_one")
    student = make_rank_deficient(student, n_crops, batch, kind).requires_grad_()
    loss, comp, expa = simdino_loss(student, teacher, n_crops, eps=0.05, expa_type=expa_type)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    ref = np_simdino(student.detach().double().numpy(), teacher.double().numpy(), n_crops, 0.05, 1.0, expa_type, 1)
    for name, got, want in zip(("loss", "comp", "expa"), (loss, comp, expa), ref):
        assert_rel(got, want, gen, what=f"{kind} {name}")


def test_virtual_ranks_equal_mean_over_ranks(gen):
    """One process at batch N*B with virtual_ranks=N == the mean over N ranks at batch B (T4)."""
    n_ranks, batch, dim, n_crops = 4, 5, 12, 3
    student, teacher = crop_features(gen, n_crops, n_ranks * batch, dim, torch.float64)
    student.requires_grad_()
    big, big_comp, big_expa = simdino_loss(student, teacher, n_crops, eps=0.05, world_size=1, virtual_ranks=n_ranks)
    big.backward()
    s = student.detach().view(n_crops, n_ranks, batch, dim)
    t = teacher.view(2, n_ranks, batch, dim)
    per_rank, grads = [], []
    for r in range(n_ranks):
        sr = s[:, r].reshape(-1, dim).clone().requires_grad_()
        out = simdino_loss(sr, t[:, r].reshape(-1, dim), n_crops, eps=0.05, world_size=n_ranks)
        out[0].backward()
        per_rank.append(torch.stack(out))
        grads.append(sr.grad.view(n_crops, 1, batch, dim))
    per_rank = torch.stack(per_rank).mean(0)
    torch.testing.assert_close(torch.stack([big, big_comp, big_expa]).detach(), per_rank, rtol=1e-12, atol=1e-12)
    # DDP averages gradients over ranks: the big process's gradient is the mean, i.e. grad_r / N.
    expected_grad = torch.cat(grads, dim=1).reshape(-1, dim) / n_ranks
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-10, atol=1e-13)


def test_reduce_cov_single_process_and_virtual_ranks(gen):
    student, teacher = crop_features(gen, 3, 8, 12)
    plain = simdino_loss(student, teacher, 3, eps=0.1)
    reduced = simdino_loss(student, teacher, 3, eps=0.1, reduce_cov=True)
    # With reduce_cov every virtual rank sees the same global covariance: splitting changes nothing.
    reduced_virtual = simdino_loss(student, teacher, 3, eps=0.1, reduce_cov=True, virtual_ranks=4)
    for a, b, c in zip(plain, reduced, reduced_virtual):
        assert torch.equal(a, b) and torch.equal(b, c)


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------

# alpha = p / (B N eps) around the reference recipe's 10 (world size 4 lowers it). The fp32 error of
# the gradient grows like kappa(I + alpha Z^T Z) * 6e-8 <= (1 + alpha * B) * 6e-8, so alpha ~ 70
# with a duplicated row would sit right at the 1e-5 bound.
@pytest.mark.parametrize("batch,dim,eps", [(6, 20, 0.3), (30, 7, 0.05), (9, 9, 0.1)])
@pytest.mark.parametrize("world_size", [1, 4])
def test_coding_rate_analytic_gradient(batch, dim, eps, world_size, gen):
    """dR/dZ = alpha Z (I + alpha Z^T Z)^-1 (spec T3), for the Gram and the covariance forms."""
    z = unit(torch.randn(2, batch, dim, generator=gen)).requires_grad_()
    z.data[1, 1] = z.data[1, 0]  # one view with a duplicated row
    rates = coding_rate(z, eps, world_size=world_size)
    rates.sum().backward()
    alpha = dim / (batch * world_size * eps)
    for g in range(2):
        zg = z[g].detach().double().numpy()
        assert_rel(rates[g], np_half_logdet_cov(zg, alpha), gen, what=f"R view {g}")
        analytic = alpha * zg @ np.linalg.inv(np.eye(dim) + alpha * zg.T @ zg)
        assert_rel(z.grad[g], analytic, gen, what=f"dR/dZ view {g}")


def numpy_fd_gradient(fn, x, h=1e-6):
    """Central finite differences of a float64 NumPy scalar function."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = fn(x)
        flat[i] = old - h
        down = fn(x)
        flat[i] = old
        gflat[i] = (up - down) / (2 * h)
    return grad


@pytest.mark.parametrize("expa_type", [0, 1])
@pytest.mark.parametrize("batch,dim,world_size,k", [(4, 6, 1, 1), (6, 4, 2, 2)])
def test_simdino_gradient_vs_numpy_finite_differences(expa_type, batch, dim, world_size, k, gen):
    n_crops = 3
    student, teacher = crop_features(gen, n_crops, batch, dim)
    # Unnormalized student rows (norms 0.5..2) so the cosine's normalization is exercised.
    student = (student * (0.5 + 1.5 * torch.rand(student.shape[0], 1, generator=gen))).requires_grad_()
    teacher.requires_grad_()
    loss, _, _ = simdino_loss(student, teacher, n_crops, eps=0.2, expa_type=expa_type, world_size=world_size,
                              virtual_ranks=k)
    loss.backward()
    assert teacher.grad is None, "the teacher is a constant target: no gradient may reach it"
    t_np = teacher.detach().double().numpy()
    fd = numpy_fd_gradient(
        lambda s: np_simdino(s, t_np, n_crops, 0.2, 1.0, expa_type, world_size, k)[0],
        student.detach().double().numpy().copy(),
    )
    assert_rel(student.grad, fd, gen, what="d loss / d student")


def test_simdino_float64_gradcheck(gen):
    student, teacher = crop_features(gen, 3, 4, 5, torch.float64)
    student.requires_grad_()
    for expa_type in (0, 1):
        assert torch.autograd.gradcheck(
            lambda s: simdino_loss(s, teacher, 3, eps=0.3, expa_type=expa_type, virtual_ranks=2)[0], (student,)
        )


# --------------------------------------------------------------------------------------
# SimDINOv2, DINO, iBOT, Sinkhorn, KoLeo
# --------------------------------------------------------------------------------------

def test_simdinov2_matches_numpy(gen):
    batch, dim, n_crops, n_patches = 4, 12, 4, 9
    student, teacher = crop_features(gen, n_crops, batch, dim)
    sp, tp = crop_features(gen, 0, n_patches, dim)[1].view(2, n_patches, dim)
    weights = torch.rand(n_patches, generator=gen)
    out = simdinov2_loss(student, teacher, sp, tp, weights, n_crops, eps=0.05, expa_type=1, world_size=2,
                         dino_weight=0.8, ibot_weight=1.5)
    loss, comp, expa = np_simdino(student.double().numpy(), teacher.double().numpy(), n_crops, 0.05, 1.0, 1, 2)
    patch = np_cos_patch(sp.double().numpy(), tp.double().numpy(), weights.double().numpy(), 2 * batch)
    s = student.double().numpy().reshape(n_crops, batch, dim)
    t = teacher.double().numpy().reshape(2, batch, dim)
    global_comp = np.mean([np.mean([np_cos(t[g, b], s[1 - g, b]) for b in range(batch)]) for g in range(2)])
    expected = {
        "total_loss": 0.8 * loss + 1.5 * patch,
        "dino_mcr_loss": loss,
        "dino_mcr_comp_loss": comp,
        "dino_mcr_global_comp_loss": global_comp,
        "dino_mcr_expa_loss": expa,
        "ibot_comp_loss": patch,
    }
    assert set(out) == set(expected)
    for key, want in expected.items():
        assert_rel(out[key], want, gen, what=key)


def test_cosine_patch_loss_unnormalized_and_empty(gen):
    s = torch.randn(7, 5, generator=gen) * 3
    t = torch.randn(7, 5, generator=gen)
    s[2] = 0  # a zero row: cosine 0 through the 1e-8 clamp, no NaN
    w = torch.rand(7, generator=gen)
    got = cosine_patch_loss(s, t, w, 6)
    assert_rel(got, np_cos_patch(s.double().numpy(), t.double().numpy(), w.double().numpy(), 6), gen)
    # No masked patch on this rank: the term is 0 and still carries a graph.
    empty = torch.zeros(0, 5, requires_grad=True)
    zero = cosine_patch_loss(empty, torch.zeros(0, 5), torch.zeros(0), 6)
    assert zero.item() == 0.0 and zero.requires_grad


@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_dino_loss_matches_numpy(teacher_temp, gen):
    n_crops, batch, n_protos = 4, 3, 7
    a = torch.randn(n_crops * batch, n_protos, generator=gen) * 2
    u = torch.randn(2 * batch, n_protos, generator=gen) * 0.5
    c = torch.randn(n_protos, generator=gen) * 0.1
    loss, new_center = dino_loss(a, u, c, n_crops, student_temp=0.1, teacher_temp=teacher_temp, center_momentum=0.9)
    ref_loss, ref_center = np_dino(a.double().numpy(), u.double().numpy(), c.double().numpy(), n_crops, 0.1,
                                   teacher_temp, 0.9)
    assert_rel(loss, ref_loss, gen, what="L_DINO")
    assert_rel(new_center, ref_center, gen, what="center")
    # The pieces agree with the composite.
    probs = softmax_center_teacher(u, c, teacher_temp)
    assert torch.equal(dino_cross_entropy(a, probs, n_crops), loss)
    assert torch.equal(update_center(c, u, 0.9), new_center)


def test_dino_cross_entropy_gradient(gen):
    n_crops, batch, n_protos = 3, 2, 5
    a = torch.randn(n_crops * batch, n_protos, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(2 * batch, n_protos, generator=gen, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: dino_cross_entropy(x, q, n_crops, 0.1), (a,))


def test_ibot_patch_loss_matches_numpy(gen):
    n_patches, n_protos = 11, 9
    a = torch.randn(n_patches, n_protos, generator=gen).requires_grad_()
    q = torch.softmax(torch.randn(n_patches, n_protos, generator=gen) / 0.3, -1)
    w = torch.rand(n_patches, generator=gen)
    loss = ibot_patch_loss(a, q, w, n_global_crops=8, student_temp=0.1)
    ref = np_patch_ce(a.detach().numpy(), q.numpy(), w.numpy(), 8, 0.1)
    assert ref > 0 and loss.item() > 0, "iBOT is a positive cross-entropy (spec 4.2 trap)"
    assert_rel(loss, ref, gen)
    loss.backward()
    fd = numpy_fd_gradient(lambda x: np_patch_ce(x, q.numpy(), w.numpy(), 8, 0.1), a.detach().double().numpy().copy())
    assert_rel(a.grad, fd, gen, what="d L_ibot / d a")


@pytest.mark.parametrize("rows,n_protos,temp,scale", [(6, 5, 0.1, 1.0), (9, 4, 0.04, 1.0), (5, 8, 0.04, 10.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_matches_numpy(rows, n_protos, temp, scale, dtype, gen):
    # scale 10 at temp 0.04: u/temp ~ 250; the spec's plain exp overflows fp32 there and, with only a
    # max subtracted, whole samples underflow to 0/0. The scaling form must stay finite and exact.
    u = (torch.randn(rows, n_protos, generator=gen) * scale / 3).to(dtype)
    q = sinkhorn_knopp(u, temp, n_iterations=3)
    assert q.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(q).all()
    ref = np_sinkhorn(u.double().numpy(), temp, 3)
    got = q.double().numpy()
    if scale == 1:
        # Entry-wise relative error: tiny assignments must be right too.
        tol = 1e-12 if dtype == torch.float64 else RTOL_FP32
        err = float(np.max(np.abs(got - ref) / np.abs(ref)))
    else:
        # |u / temp| ~ 250: rounding u / temp alone costs 250 ulp in the exponent (~1.5e-5 in fp32,
        # ~6e-14 in float64), and true assignments below 1e-30 are beyond fp32's normal range.
        assert_rel(q, ref, gen, what="sinkhorn (large logits), norm-wise")
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        keep = ref > 1e-30
        err = float(np.max(np.abs(got - ref)[keep] / ref[keep]))
    assert err <= tol, f"sinkhorn entry-wise relative error {err:.3g} > {tol} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("batch,dim", [(5, 3), (8, 16)])
def test_koleo_matches_numpy(batch, dim, gen):
    x = torch.randn(batch, dim, generator=gen) * 4
    x[3] = x[1] * 2  # same direction as row 1: distance 0, only the 1e-8 offsets keep it finite
    x.requires_grad_()
    got = koleo_loss(x)
    assert_rel(got, np_koleo(x.detach().numpy()), gen)
    # Batched (G, B, D) is one value per group.
    stacked = torch.stack([x.detach(), x.detach().flip(0) * 0.5])
    torch.testing.assert_close(koleo_loss(stacked), torch.stack([got.detach(), koleo_loss(x.detach().flip(0))]))


def test_koleo_gradient(gen):
    x = torch.randn(6, 4, generator=gen).requires_grad_()
    koleo_loss(x).backward()
    fd = numpy_fd_gradient(np_koleo, x.detach().double().numpy().copy())
    assert_rel(x.grad, fd, gen, tol=1e-4, what="d KoLeo / d x")

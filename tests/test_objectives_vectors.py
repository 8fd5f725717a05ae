"""Spec section 8 hand-checkable vectors for every objective, in float64 (1e-12) and float32 (1e-6)."""
import math

import pytest
import torch

from flashdino.engine.objectives import (
    coding_rate,
    coding_rate_gamma,
    cosine_patch_loss,
    dino_loss,
    koleo_loss,
    simdino_loss,
    simdinov2_loss,
    sinkhorn_knopp,
)

# float64 must match to ~1e-12; float32 to ~1e-6 (spec section 8).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
DTYPES = list(TOLERANCE)


def close(actual, expected, dtype, scale=1.0):
    tol = TOLERANCE[dtype] * scale
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual, expected, rtol=tol, atol=tol), (actual.tolist(), expected.tolist(), tol)


# Inputs A: V = 3 (2 global + 1 local), B = 2, p = 2, crop-major.
STUDENT_A = [[1, 0], [0, 1], [0.6, 0.8], [1, 0], [0, 1], [-1, 0]]
TEACHER_A = [[1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1]]

# (expa_type, eps, world_size) -> expa; loss = -comp - expa with comp = 0.375.
EXPA_A = {
    (0, 0.5, 1): 1.0550239418819152,
    (0, 0.5, 8): 0.12347852611696278,
    (0, 0.05, 1): 2.9456942535623867,
    (1, 0.5, 1): 0.8651682771143161,
    (1, 0.5, 8): 0.1036708455944702,
    (1, 0.05, 1): 2.3288507108057965,
}
LOSS_A = {
    (0, 0.5, 1): -1.4300239418819152,
    (0, 0.5, 8): -0.49847852611696275,
    (0, 0.05, 1): -3.3206942535623867,
    (1, 0.5, 1): -1.240168277114316,
    (1, 0.5, 8): -0.4786708455944702,
    (1, 0.05, 1): -2.7038507108057965,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", sorted(EXPA_A))
def test_simdino_inputs_a(key, dtype):
    expa_type, eps, world_size = key
    s, t = torch.tensor(STUDENT_A, dtype=dtype), torch.tensor(TEACHER_A, dtype=dtype)
    loss, comp, expa = simdino_loss(s, t, 3, eps=eps, coeff=1.0, expa_type=expa_type, world_size=world_size)
    close(comp, 0.375, dtype)
    close(expa, EXPA_A[key], dtype)
    close(loss, LOSS_A[key], dtype)
    assert loss.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_a_per_view_rates(dtype):
    # Spec: eps 0.5, N 1, expa_type 0: R0 = ln 3, R1 = 1/2 ln 7.56.
    s = torch.tensor(STUDENT_A, dtype=dtype).view(3, 2, 2)
    rates = coding_rate(s[:2], eps=0.5)
    close(rates, [math.log(3), 0.5 * math.log(7.56)], dtype)
    close(coding_rate(s[1], eps=0.5), 0.5 * math.log(7.56), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,eps", [(2, 0.5), (5, 0.5), (16, 0.05), (64, 0.2)])
def test_closed_form_orthonormal(p, eps, dtype):
    # Z = I_p (B = p orthonormal rows), N = 1: expa = gamma * R = log(1 + 1/eps) for any p.
    z = torch.eye(p, dtype=dtype)
    close(coding_rate_gamma(p, p, 1) * coding_rate(z, eps), math.log(1 + 1 / eps), dtype)
    # Same through the loss: both global views equal I, expa_type 0.
    student = torch.cat([z, z, -z])
    _, _, expa = simdino_loss(student, torch.cat([z, z]), 3, eps=eps, expa_type=0)
    close(expa, math.log(1 + 1 / eps), dtype)


# DINO CE example: K = 3, B = 2, V = 3, student temp 0.1, center (0.05, -0.05, 0).
STUDENT_LOGITS = [[0.5, 0.1, -0.2], [0, 0.3, 0.2], [0.1, 0.4, -0.1], [0.2, -0.2, 0.1], [-0.3, 0.2, 0.6], [0.05, 0.05, 0]]
TEACHER_LOGITS = [[0.4, 0, -0.1], [0.1, 0.2, 0.3], [0, 0.5, 0.1], [0.3, -0.1, 0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher_temp,expected", [(0.04, 3.4683483384543927), (0.07, 3.472462710659295)])
@pytest.mark.parametrize("center_shape", [(3,), (1, 3)])
def test_dino_example(teacher_temp, expected, dtype, center_shape):
    center = torch.tensor([0.05, -0.05, 0.0], dtype=dtype).reshape(center_shape)
    before = center.clone()
    loss, new_center = dino_loss(
        torch.tensor(STUDENT_LOGITS, dtype=dtype), torch.tensor(TEACHER_LOGITS, dtype=dtype), center, 3,
        student_temp=0.1, teacher_temp=teacher_temp, center_momentum=0.9,
    )
    close(loss, expected, dtype)
    assert new_center.shape == center.shape
    close(new_center.flatten(), [0.065, -0.03, 0.0075], dtype)
    assert torch.equal(center, before), "update_center must not mutate the old center"


@pytest.mark.parametrize("dtype", DTYPES)
def test_koleo_example(dtype):
    close(koleo_loss(torch.tensor([[1, 0], [0, 1], [0.6, 0.8]], dtype=dtype)), 0.3426208232427144, dtype)


SINKHORN_ROWS = [[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.1, 0.0, 0.7], [0.2, 0.6, 0.1]]
SINKHORN_EXPECTED = [
    [0.96981633, 0.02599452, 0.00418916],
    [0.81302783, 0.16102252, 0.02594965],
    [0.00007067, 0.00207714, 0.99785220],
    [0.00022850, 0.99682919, 0.00294231],
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_example(dtype):
    q = sinkhorn_knopp(torch.tensor(SINKHORN_ROWS, dtype=dtype), teacher_temp=0.1, n_iterations=3)
    # The spec prints 8 decimals: half a unit in the last place for float64 (full precision is
    # checked against the NumPy loop in test_objectives_parity.py).
    tol = 5.01e-9 if dtype == torch.float64 else 1e-6
    assert torch.allclose(q.double(), torch.tensor(SINKHORN_EXPECTED, dtype=torch.float64), rtol=0, atol=tol)
    close(q.sum(-1), [1.0] * 4, dtype)


PATCH_S = [[1, 0], [0.6, 0.8], [0, 1], [0.8, 0.6]]
PATCH_T = [[0.6, 0.8], [0.6, 0.8], [1, 0], [0.8, 0.6]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_patch_example(dtype):
    w = torch.full((4,), 0.5, dtype=dtype)
    s, t = torch.tensor(PATCH_S, dtype=dtype), torch.tensor(PATCH_T, dtype=dtype)
    close(cosine_patch_loss(s, t, w, n_global_crops=3), -0.43333333333333335, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_simdinov2_combines_vectors(dtype):
    # Inputs A for the CLS term (expa_type 1, eps 0.5, N 1) + the patch example (n_global_crops = 2B = 4).
    s, t = torch.tensor(STUDENT_A, dtype=dtype), torch.tensor(TEACHER_A, dtype=dtype)
    sp, tp = torch.tensor(PATCH_S, dtype=dtype), torch.tensor(PATCH_T, dtype=dtype)
    out = simdinov2_loss(s, t, sp, tp, torch.full((4,), 0.5, dtype=dtype), 3, eps=0.5, expa_type=1,
                         dino_weight=1.0, ibot_weight=0.5)
    patch = -(0.5 * 2.6) / 4
    close(out["dino_mcr_loss"], LOSS_A[(1, 0.5, 1)], dtype)
    close(out["dino_mcr_comp_loss"], 0.375, dtype)
    close(out["dino_mcr_global_comp_loss"], (0.6 + 0.9) / 2, dtype)  # (C[0,1] + C[1,0]) / 2
    close(out["dino_mcr_expa_loss"], EXPA_A[(1, 0.5, 1)], dtype)
    close(out["ibot_comp_loss"], patch, dtype)
    close(out["total_loss"], LOSS_A[(1, 0.5, 1)] + 0.5 * patch, dtype)

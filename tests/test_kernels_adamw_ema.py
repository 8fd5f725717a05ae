"""Fused AdamW + teacher EMA: flat op (ZeRO shards) and the optimizer, against float64 and torch.

Reference semantics: torch.optim.AdamW (decoupled decay multiplied by lr, bias correction,
per-parameter step counts) followed by ``_foreach_lerp_(teacher, student, 1 - momentum)``.
"""
import copy

import numpy as np
import pytest
import torch

from flashdino.kernels import FusedAdamWEMA, adamw_ema_
from flashdino.kernels.testing import assert_close64, assert_guards_intact, guarded_views, poisoned

EPS32 = 2.0 ** -23


def adamw_ema_64(p, g, m, v, t, *, lr, wd, b1, b2, eps, step, mom):
    """Independent float64 NumPy AdamW + EMA (spec 1.5 / 1.7)."""
    p, g, m, v, t = (np.asarray(x, np.float64).copy() for x in (p, g, m, v, t))
    p *= 1.0 - lr * wd
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
    p -= (lr / bc1) * m / (np.sqrt(v) / np.sqrt(bc2) + eps)
    t = mom * t + (1.0 - mom) * p
    return p, m, v, t


def _np(x):
    return x.detach().double().cpu().numpy()


@pytest.mark.parametrize("kind", ["eager", "triton"])
@pytest.mark.parametrize("g_dtype,t_dtype,copy_dtype", [
    (torch.float32, torch.float32, None),
    (torch.float16, torch.float16, torch.float16),  # fp16 model copy + fp16 teacher, fp32 masters
    (torch.float32, torch.float16, None),
])
def test_flat_step_matches_float64(kind, g_dtype, t_dtype, copy_dtype):
    gen = torch.Generator().manual_seed(21)
    n = 3000
    master = torch.randn(n, generator=gen)
    m = 0.1 * torch.randn(n, generator=gen)
    v = torch.rand(n, generator=gen) * 0.01
    t_buf, (teacher,), t_guard = guarded_views([(n,)], t_dtype, generator=gen)
    hp = dict(lr=3e-3, weight_decay=0.04, betas=(0.9, 0.999), eps=1e-8, step=4, momentum=0.9)
    for it in range(2):
        g = torch.randn(n, generator=gen).to(g_dtype)
        ref = adamw_ema_64(_np(master), _np(g), _np(m), _np(v), _np(teacher), lr=hp["lr"], wd=hp["weight_decay"],
                           b1=0.9, b2=0.999, eps=1e-8, step=hp["step"], mom=hp["momentum"])
        p_before = _np(master)
        model_copy = poisoned((n,), copy_dtype) if copy_dtype is not None else None
        adamw_ema_(master, g, m, v, teacher, model_copy=model_copy, kind=kind, **hp)
        # Rounding: a few fp32 ulps of |p| (plus lr·ulp for the normalized update, ≤ |p|-scale).
        assert_close64(master, ref[0], np.abs(p_before) + hp["lr"], ulps=4, what=f"{kind} master")
        assert_close64(m, ref[1], np.abs(_np(g)) + np.abs(ref[1]), ulps=4, what=f"{kind} exp_avg")
        assert_close64(v, ref[2], ref[2], ulps=4, what=f"{kind} exp_avg_sq")
        assert_close64(teacher, ref[3], np.abs(ref[3]) + np.abs(ref[0]), ulps=2, what=f"{kind} teacher",
                       dtype=t_dtype if t_dtype != torch.float32 else torch.float32)
        if model_copy is not None:
            assert torch.equal(model_copy, master.to(copy_dtype)), "model copy must be the rounded master"
        hp["step"] += 1
    assert_guards_intact(t_buf, t_guard, f"{kind} teacher")


def test_flat_triton_equals_eager_to_rounding():
    gen = torch.Generator().manual_seed(5)
    n = 2500
    states = [torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen), torch.rand(n, generator=gen),
              torch.randn(n, generator=gen)]
    g = torch.randn(n, generator=gen)
    a = [s.clone() for s in states]
    b = [s.clone() for s in states]
    hp = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6, step=1, momentum=0.996)
    adamw_ema_(a[0], g, a[1], a[2], a[3], kind="triton", **hp)
    adamw_ema_(b[0], g, b[1], b[2], b[3], kind="eager", **hp)
    for name, x, y, s in zip(("master", "exp_avg", "exp_avg_sq", "teacher"), a, b, states):
        assert bool(((x - y).abs() <= 4 * EPS32 * (x.abs() + s.abs() + g.abs())).all()), name


@pytest.mark.parametrize("kind", ["eager", "triton"])
def test_two_shards_equal_unsharded(kind):
    """A ZeRO rank updates its own slice of the flat buffers; slices compose to the full update."""
    gen = torch.Generator().manual_seed(8)
    n, cut = 5003, 2049  # uneven, unaligned cut
    full = [torch.randn(n, generator=gen), 0.1 * torch.randn(n, generator=gen), torch.rand(n, generator=gen) * 1e-3,
            torch.randn(n, generator=gen).half()]
    g = torch.randn(n, generator=gen)
    shard = [x.clone() for x in full]
    hp = dict(lr=2e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8, step=3, momentum=0.99)
    copy_full, copy_shard = poisoned((n,), torch.float16), poisoned((n,), torch.float16)
    adamw_ema_(full[0], g, full[1], full[2], full[3], model_copy=copy_full, kind=kind, **hp)
    for sl in (slice(0, cut), slice(cut, n)):
        adamw_ema_(shard[0][sl], g[sl], shard[1][sl], shard[2][sl], shard[3][sl], model_copy=copy_shard[sl],
                   kind=kind, **hp)
    for x, y in zip(full + [copy_full], shard + [copy_shard]):
        assert torch.equal(x, y)
    assert not copy_full.isnan().any()


def test_flat_rejects_bad_input():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="grad has 5 elements"):
        adamw_ema_(x, torch.zeros(5), x.clone(), x.clone(), x.clone(), lr=1e-3, weight_decay=0, step=1, momentum=0.9)
    with pytest.raises(TypeError, match="master has dtype torch.float16"):
        adamw_ema_(x.half(), x, x.clone(), x.clone(), x.clone(), lr=1e-3, weight_decay=0, step=1, momentum=0.9)
    with pytest.raises(ValueError, match="step count"):
        adamw_ema_(x, x, x.clone(), x.clone(), x.clone(), lr=1e-3, weight_decay=0, step=0, momentum=0.9,
                   kind="triton")
    with pytest.raises(ValueError, match="momentum"):
        adamw_ema_(x, x, x.clone(), x.clone(), x.clone(), lr=1e-3, weight_decay=0, step=1, momentum=-0.1)


# ------------------------------------------------------------------------------------ optimizer

def _model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(9, 33), torch.nn.LayerNorm(33), torch.nn.Linear(33, 5)).to(dtype)


def _groups(model):
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _schedule(i):
    return dict(lr=1e-2 * (1 + i), wd=0.04 + 0.1 * i, mom=0.9 + 0.03 * i)


@pytest.mark.parametrize("kind", ["eager", "triton"])
def test_optimizer_matches_torch_adamw_then_lerp(kind):
    student, ref_student = _model(0), _model(0)
    teacher, ref_teacher = copy.deepcopy(student), copy.deepcopy(student)
    pairs = dict(zip(student.parameters(), teacher.parameters()))
    opt = FusedAdamWEMA(_groups(student), pairs, betas=(0.9, 0.999), eps=1e-8, kind=kind)
    ref_opt = torch.optim.AdamW(_groups(ref_student), betas=(0.9, 0.999), eps=1e-8, foreach=True)
    gen = torch.Generator().manual_seed(1)
    for i in range(3):
        sched = _schedule(i)
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"] = o.param_groups[1]["lr"] = sched["lr"]
            o.param_groups[0]["weight_decay"] = sched["wd"]
        grads = [torch.randn(p.shape, generator=gen) for p in student.parameters()]
        for k, (p, q) in enumerate(zip(student.parameters(), ref_student.parameters())):
            # Step 0: the last bias has no gradient: AdamW skips it (its step count lags), EMA does not.
            has = not (i == 0 and k == len(grads) - 1)
            p.grad = grads[k].clone() if has else None
            q.grad = grads[k].clone() if has else None
        opt.step(sched["mom"])
        ref_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ref_teacher.parameters()), list(ref_student.parameters()), 1 - sched["mom"])
        for (name, a), b, ta, tb in zip(student.named_parameters(), ref_student.parameters(),
                                        teacher.parameters(), ref_teacher.parameters()):
            scale = b.detach().abs() + sched["lr"]
            assert bool(((a - b).abs() <= 8 * EPS32 * scale).all()), f"{kind} step {i} student {name}"
            assert bool(((ta - tb).abs() <= 8 * EPS32 * (tb.abs() + scale)).all()), f"{kind} step {i} teacher {name}"
    assert ref_opt.state[list(ref_student.parameters())[-1]]["step"] == 2


@pytest.mark.parametrize("kind", ["eager", "triton"])
def test_optimizer_master_weights_fp16(kind):
    """fp16 model + fp16 teacher, fp32 masters: masters follow fp32 AdamW fed the fp16 grads."""
    student = _model(2, torch.float16)
    teacher = copy.deepcopy(student)
    masters = [p.detach().float().clone().requires_grad_() for p in student.parameters()]
    ref_opt = torch.optim.AdamW(masters, lr=5e-3, weight_decay=0.05)
    opt = FusedAdamWEMA(student.parameters(), list(teacher.parameters()), lr=5e-3, weight_decay=0.05, kind=kind)
    assert opt.master_weights
    ref_teacher = [t.detach().clone() for t in teacher.parameters()]
    gen = torch.Generator().manual_seed(4)
    for i in range(2):
        for p, mp in zip(student.parameters(), masters):
            g = torch.randn(p.shape, generator=gen).half()
            p.grad, mp.grad = g, g.float()
        opt.step(0.95)
        ref_opt.step()
        for k, (p, mp, t) in enumerate(zip(student.parameters(), masters, teacher.parameters())):
            master = opt.state[p]["master"]
            assert bool(((master - mp).abs() <= 8 * EPS32 * (mp.abs() + 5e-3)).all()), f"master {k}"
            assert torch.equal(p.detach(), master.half()), f"model copy {k} is the rounded master"
            ref_t = (0.95 * ref_teacher[k].double() + 0.05 * mp.detach().double())
            assert_close64(t, ref_t, ref_t.abs() + mp.detach().double().abs(), ulps=1, what=f"teacher {k}")
            ref_teacher[k] = t.detach().clone()


@pytest.mark.parametrize("kind", ["eager", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_optimizer_ema_step_moves_only_the_teacher(kind, dtype):
    """ema_step (a step the GradScaler skipped): teacher <- m t + (1-m) master in float64 terms; the
    student, its masters, the Adam moments and the step counts stay as they were."""
    student = _model(5, dtype)
    teacher = copy.deepcopy(student)
    opt = FusedAdamWEMA(student.parameters(), list(teacher.parameters()), lr=1e-2, weight_decay=0.05, kind=kind)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for p in student.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt.step(0.9)  # student and teacher now differ
    params = list(student.parameters())
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params}
    student_before = [p.detach().clone() for p in params]
    masters = [opt.state[p]["master"] if opt.master_weights else p.detach() for p in params]
    teacher_before = [t.detach().double().clone() for t in teacher.parameters()]
    opt.ema_step(0.8)
    assert opt.steps_taken == 1
    for k, (p, t) in enumerate(zip(params, teacher.parameters())):
        assert torch.equal(p.detach(), student_before[k])
        for name, value in before[id(p)].items():
            assert torch.equal(opt.state[p][name], value), (k, name)
        ref_t = 0.8 * teacher_before[k] + 0.2 * masters[k].double()
        assert_close64(t, ref_t, ref_t.abs() + masters[k].double().abs(), ulps=1, what=f"teacher {k}")


def test_optimizer_state_dict_roundtrip_resumes_exactly():
    student = _model(3, torch.float16)
    teacher = copy.deepcopy(student)
    opt = FusedAdamWEMA(_groups(student), dict(zip(student.parameters(), teacher.parameters())), kind="triton")
    gen = torch.Generator().manual_seed(9)

    def grads():
        for p in student.parameters():
            p.grad = torch.randn(p.shape, generator=gen).half()

    grads()
    opt.step(0.9)
    saved = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    grads()
    g_next = [p.grad.clone() for p in student.parameters()]
    opt.step(0.9)
    expected = [p.detach().clone() for p in student.parameters()] + [t.detach().clone() for t in teacher.parameters()]

    student2, teacher2 = _model(99, torch.float16), _model(98, torch.float16)
    student2.load_state_dict(weights[0])
    teacher2.load_state_dict(weights[1])
    pairs2 = dict(zip(student2.parameters(), teacher2.parameters()))
    opt2 = FusedAdamWEMA(_groups(student2), pairs2, kind="triton")
    opt2.load_state_dict(saved)
    for p, g in zip(student2.parameters(), g_next):
        p.grad = g.clone()
    opt2.step(0.9)
    got = [p.detach() for p in student2.parameters()] + [t.detach() for t in teacher2.parameters()]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert int(opt2.state_dict()["state"][0]["step"]) == 2


def test_optimizer_rejects_bad_setup():
    student, teacher = _model(0), _model(1)
    with pytest.raises(ValueError, match="1 teacher tensors but 6"):
        FusedAdamWEMA(student.parameters(), [next(teacher.parameters())])
    half = _model(0, torch.float16)
    with pytest.raises(ValueError, match="master_weights=True"):
        FusedAdamWEMA(half.parameters(), list(_model(0, torch.float16).parameters()), master_weights=False)
    opt = FusedAdamWEMA(student.parameters(), list(teacher.parameters()))
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


@pytest.mark.gpu
def test_optimizer_bf16_master_weights_gpu():
    student = _model(5).to("cuda", torch.bfloat16)
    teacher = copy.deepcopy(student)
    masters = [p.detach().float().clone().requires_grad_() for p in student.parameters()]
    ref_opt = torch.optim.AdamW(masters, lr=1e-3, weight_decay=0.04)
    opt = FusedAdamWEMA(student.parameters(), list(teacher.parameters()), lr=1e-3, weight_decay=0.04)
    for p, mp in zip(student.parameters(), masters):
        g = torch.randn_like(p)
        p.grad, mp.grad = g, g.float()
    opt.step(0.99)
    ref_opt.step()
    for p, mp in zip(student.parameters(), masters):
        assert torch.allclose(opt.state[p]["master"], mp, rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), opt.state[p]["master"].bfloat16())


def test_optimizer_works_with_grad_scaler():
    """GradScaler.step(opt, momentum) unscales the gradients, then forwards momentum to step()."""
    student, ref_student = _model(6), _model(6)
    teacher, ref_teacher = copy.deepcopy(student), copy.deepcopy(student)
    opt = FusedAdamWEMA(student.parameters(), list(teacher.parameters()), lr=1e-2, kind="triton")
    ref_opt = torch.optim.AdamW(ref_student.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(4, 9)
    scaler.scale(student(x).square().mean()).backward()
    scaler.step(opt, 0.9)
    scaler.update()
    ref_student(x).square().mean().backward()
    ref_opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ref_teacher.parameters()), list(ref_student.parameters()), 0.1)
    for a, b in zip(list(student.parameters()) + list(teacher.parameters()),
                    list(ref_student.parameters()) + list(ref_teacher.parameters())):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_pointer_tables_are_reused_while_gradients_stay_in_place():
    student = _model(7)
    teacher = copy.deepcopy(student)
    opt = FusedAdamWEMA(student.parameters(), list(teacher.parameters()), kind="triton")
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    for _ in range(3):
        for p in student.parameters():
            p.grad.copy_(torch.randn_like(p))  # same storage, as with zero_grad(set_to_none=False)
        opt.step(0.9)
    assert opt.table_rebuilds == 0
    for p in student.parameters():
        p.grad = torch.randn_like(p)  # fresh storage: the table must follow it
    before = [t.detach().clone() for t in teacher.parameters()]
    opt.step(0.9)
    assert opt.table_rebuilds == 1
    assert all(not torch.equal(a, b) for a, b in zip(teacher.parameters(), before))


def test_optimizer_refuses_a_non_contiguous_gradient():
    """The Triton step reads gradients in memory order: a hand-set transposed .grad would be read
    scrambled, so it is refused (autograd's gradients follow the contiguous parameters)."""
    student = torch.nn.Linear(4, 3, bias=False)
    teacher = copy.deepcopy(student)
    opt = FusedAdamWEMA(student.parameters(), list(teacher.parameters()), kind="triton")
    student.weight.grad = torch.arange(12.0).reshape(4, 3).t()
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step(0.99)

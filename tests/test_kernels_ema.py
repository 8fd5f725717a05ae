"""Teacher EMA updaters (eager and Triton) against a float64 computation of θ_t ← m θ_t + (1−m) θ_s."""
import numpy as np
import pytest
import torch

from flashdino.kernels import get_ema_updater
from flashdino.kernels.ema.triton_ema import CHUNK
from flashdino.kernels.testing import assert_close64, assert_guards_intact, guarded_views

# Sizes: scalar-like, odd, one crossing a BLOCK boundary, one spanning three table chunks.
SIZES = [(1,), (7, 5), (3, 1025), (2 * CHUNK + 37,)]


def _ema64(t, s, m):
    return m * t.double() + (1.0 - m) * s.double()


@pytest.mark.parametrize("kind", ["eager", "triton"])
@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_ema_matches_float64(kind, t_dtype, s_dtype):
    gen = torch.Generator().manual_seed(1234 + hash((kind, str(t_dtype), str(s_dtype))) % 1000)
    t_buf, teacher, t_guard = guarded_views(SIZES, t_dtype, generator=gen)
    s_buf, student, s_guard = guarded_views(SIZES, s_dtype, generator=gen)
    before = [t.clone() for t in teacher]
    s_before = s_buf.clone()
    updater = get_ema_updater(kind)(teacher, student)
    for momentum in (0.5, 0.996, 0.3):  # 0.3: lerp weight 0.7 takes torch.lerp's second branch
        ref = [_ema64(t, s, momentum) for t, s in zip(before, student)]
        updater.update(momentum)
        for i, (out, r, s) in enumerate(zip(teacher, ref, student)):
            # fp32 arithmetic plus one rounding into the teacher dtype.
            scale = before[i].double().abs() + s.double().abs()
            assert_close64(out, r, scale, ulps=2, what=f"{kind} EMA tensor {i} m={momentum}", dtype=t_dtype)
            if momentum == 0.5 and r.numel() > 1:
                # The check is sensitive: an element left unwritten would be off by ≫ the tolerance.
                change = (r - before[i].double()).abs()
                assert float((change > 8 * 2.0 ** -10 * scale).double().mean()) > 0.9
        before = [t.clone() for t in teacher]
    assert_guards_intact(t_buf, t_guard, f"{kind} EMA teacher buffer")
    assert torch.equal(s_buf.isnan(), s_before.isnan()) and torch.equal(s_buf[~s_guard], s_before[~s_guard])


def test_triton_matches_foreach_lerp_to_rounding():
    gen = torch.Generator().manual_seed(7)
    student = [torch.randn(s, generator=gen) for s in SIZES]
    t_tri = [torch.randn(s, generator=gen) for s in SIZES]
    t_ref = [t.clone() for t in t_tri]
    scale = [torch.maximum(t.abs(), s.abs()) for t, s in zip(t_tri, student)]
    get_ema_updater("triton")(t_tri, student).update(0.99)
    torch._foreach_lerp_(t_ref, student, 1 - 0.99)
    for a, b, sc in zip(t_tri, t_ref, scale):
        # Two fp32 ulps of the larger operand: FMA contraction may differ, nothing else.
        assert bool(((a - b).abs() <= 2 * 2.0 ** -23 * sc).all())


def test_triton_updater_follows_moved_storage():
    gen = torch.Generator().manual_seed(3)
    teacher = [torch.randn(10, generator=gen), torch.randn(4, 4, generator=gen)]
    student = [torch.randn(10, generator=gen), torch.randn(4, 4, generator=gen)]
    updater = get_ema_updater("triton")(teacher, student)
    teacher[1].data = torch.randn(4, 4, generator=gen)  # storage moves: the table must be rebuilt
    expected = _ema64(teacher[1], student[1], 0.9)
    updater.update(0.9)
    assert updater.rebuilds == 1
    assert_close64(teacher[1], expected, teacher[1].double().abs() + 3, ulps=4, what="moved teacher")


@pytest.mark.parametrize("kind", ["eager", "triton"])
def test_ema_rejects_bad_input(kind):
    cls = get_ema_updater(kind)
    with pytest.raises(ValueError, match="shape"):
        cls([torch.zeros(3)], [torch.zeros(4)])
    with pytest.raises(ValueError, match="2 teacher tensors but 1"):
        cls([torch.zeros(3), torch.zeros(3)], [torch.zeros(3)])
    with pytest.raises(TypeError, match="float64"):
        cls([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3, dtype=torch.float64)])
    updater = cls([torch.zeros(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="momentum"):
        updater.update(1.5)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        get_ema_updater("cuda")


def test_triton_rejects_non_contiguous():
    t = torch.zeros(4, 4).t()
    with pytest.raises(ValueError, match="not contiguous"):
        get_ema_updater("triton")([t], [torch.zeros(4, 4)])


@pytest.mark.gpu
@pytest.mark.parametrize("t_dtype,s_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_ema_bf16_gpu(t_dtype, s_dtype):
    gen = torch.Generator().manual_seed(11)
    student = [torch.randn(s, generator=gen).to("cuda", s_dtype) for s in SIZES]
    teacher = [torch.randn(s, generator=gen).to("cuda", t_dtype) for s in SIZES]
    ref = [_ema64(t, s, 0.99) for t, s in zip(teacher, student)]
    get_ema_updater("triton")(teacher, student).update(0.99)
    for i, (out, r, s) in enumerate(zip(teacher, ref, student)):
        assert_close64(out, r, r.abs() + s.double().abs(), ulps=2, what=f"bf16 EMA {i}", dtype=t_dtype)


def test_updater_numel_counts_every_element():
    teacher = [torch.zeros(s) for s in SIZES]
    assert get_ema_updater("eager")(teacher, teacher).numel == sum(int(np.prod(s)) for s in SIZES)


def test_triton_updater_follows_a_dtype_change_of_param_data():
    """module.half() after the updater was built swaps each parameter's .data for fp16: the kernel
    must then read fp16, not the fp32 it was grouped for (it read garbage, or wrote out of bounds)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    teacher = [torch.nn.Parameter(torch.randn(n, generator=gen), requires_grad=False) for n in (1025, 7)]
    student = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (1025, 7)]
    updater = get_ema_updater("triton")(teacher, student)
    for p in teacher + student:
        p.data = p.data.half()
    before = [(t.detach().double().clone(), s.detach().double()) for t, s in zip(teacher, student)]
    updater.update(0.75)
    assert updater.rebuilds == 1
    for t, (t0, s0) in zip(teacher, before):
        assert t.dtype == torch.float16
        ref = 0.75 * t0 + 0.25 * s0
        assert_close64(t, ref, ref.abs() + s0.abs(), ulps=1, what="fp16 teacher after the dtype change")

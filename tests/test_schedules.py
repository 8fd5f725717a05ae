"""Schedules against the spec's formulas (section 1.4) and the shipped log (section 6.3 / 8)."""
import math

import numpy as np
import pytest

from flashdino.engine.config import build_config
from flashdino.engine.schedules import CosineSchedule, LinearWarmupConstant, PerEpochLinear, build_schedules, scaled_peak_lr


def _v1_reference(peak, final, epochs, n, warmup_epochs, start=0.0):
    """Independent float64 construction: linspace warmup + cosine over the rest (as an array)."""
    warm = np.linspace(start, peak, warmup_epochs * n)
    iters = np.arange(epochs * n - warmup_epochs * n)
    cos = final + 0.5 * (peak - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warm, cos])


def test_v1_lr_epoch0_mean_matches_shipped_log():
    n = 2502
    sched = CosineSchedule(1e-3, 1e-6, 100 * n, 10 * n, 0.0, "v1")
    epoch0 = np.array([sched(i) for i in range(n)])
    assert epoch0.mean() == pytest.approx(4.9982013669611094e-05, rel=1e-12)
    epoch10 = np.array([sched(i) for i in range(10 * n, 11 * n)])
    assert epoch10.mean() == pytest.approx(9.998986e-4, rel=1e-6)


def test_v1_wd_epoch0_mean_matches_shipped_log():
    n = 2502
    wd = CosineSchedule(0.04, 0.4, 100 * n, 0, 0.0, "v1")
    assert np.mean([wd(i) for i in range(n)]) == pytest.approx(0.04002958960483862, rel=1e-12)


def test_v1_matches_array_construction_everywhere():
    ref = _v1_reference(2e-3, 1e-6, 7, 13, 2)
    sched = CosineSchedule(2e-3, 1e-6, 7 * 13, 2 * 13, 0.0, "v1")
    got = np.array([sched(i) for i in range(7 * 13)])
    np.testing.assert_allclose(got, ref, rtol=1e-13, atol=0)
    assert sched(2 * 13 - 1) == pytest.approx(2e-3)  # v1 reaches the peak inside warmup


def test_v2_warmup_excludes_endpoint_and_freeze():
    s = CosineSchedule(4e-3, 1e-6, 100, 10, 1e-6, "v2", freeze_iters=5)
    assert s(0) == 0.0 and s(4) == 0.0
    assert s(5) == pytest.approx(1e-6 + (4e-3 - 1e-6) * 5 / 10)
    assert s(9) < 4e-3 and s(10) == pytest.approx(4e-3)
    assert s(100) == 1e-6 and s(1000) == 1e-6
    mid = 55
    assert s(mid) == pytest.approx(1e-6 + 0.5 * (4e-3 - 1e-6) * (1 + math.cos(math.pi * 45 / 90)))


def test_teacher_temperatures():
    v2 = LinearWarmupConstant(0.04, 0.07, 30 * 10)
    assert v2(0) == 0.04 and v2(150) == pytest.approx(0.055) and v2(300) == 0.07
    v1 = PerEpochLinear(0.04, 0.07, 4, 10)
    assert v1(0) == 0.04 and v1(39) == pytest.approx(0.07) and v1(15) == pytest.approx(0.05)


def test_lr_scaling_rules():
    assert scaled_peak_lr(5e-4, "linear_wrt_256", 512) == pytest.approx(1e-3)
    assert scaled_peak_lr(4e-3, "sqrt_wrt_1024", 512) == pytest.approx(2.828427e-3, rel=1e-6)
    with pytest.raises(ValueError):
        scaled_peak_lr(1.0, "cubic", 1)


def test_build_schedules_from_presets():
    cfg = build_config("simdinov2_vitb16")
    s = build_schedules(cfg, iters_per_epoch=1251, world_size=8)
    assert s.lr.peak == pytest.approx(2.828427e-3, rel=1e-6) and s.momentum(0) == pytest.approx(0.9)
    assert s.momentum(s.total_iters) == 1.0 and s.last_layer_lr(0) > 0  # only DINOv2 freezes the last layer
    d = build_schedules(build_config("dinov2_vitb16"), iters_per_epoch=100, world_size=1)
    assert d.last_layer_lr(99) == 0.0 and d.last_layer_lr(100) > 0.0
    assert d.teacher_temp(0) == 0.04 and d.teacher_temp(3000) == pytest.approx(0.07)


def test_single_warmup_step_is_start_like_np_linspace():
    """np.linspace(a, b, 1) == [a]: a one-iteration (or one-epoch) warmup holds the start value."""
    assert np.linspace(0.04, 0.07, 1).tolist() == [0.04]
    assert PerEpochLinear(0.04, 0.07, 1, 10)(5) == 0.04 and PerEpochLinear(0.04, 0.07, 1, 10)(10) == 0.07
    s = CosineSchedule(1e-3, 1e-6, 10, 1, 0.0, "v1")
    ref = _v1_reference(1e-3, 1e-6, 10, 1, 1)
    np.testing.assert_allclose([s(i) for i in range(10)], ref, rtol=1e-13, atol=0)

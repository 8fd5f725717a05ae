"""Vectorized iBOT masks (pipelines/fast_masking.py) against the reference per-sample generator.

The two consume random numbers differently, so they are compared in distribution: two-sample
chi-square tests (fixed seeds, so the tests are deterministic) on histograms of masked-patch
counts, rows/columns touched (block shapes) and per-patch frequencies. Threshold p > 1e-3; a
control with a deliberately different block-aspect range shows the same tests reject (p < 1e-6).
"""
import numpy as np
import pytest
import torch
from scipy import stats

from flashdino.pipelines.fast_masking import (
    FastBatchMasking,
    VectorizedBlockMaskGenerator,
    sample_batch_masks_fast,
    stratified_targets,
)
from flashdino.pipelines.masking import (
    BlockMaskGenerator,
    mask_indices_and_weights,
    mask_ratio_edges,
    sample_batch_masks,
    stratified_target,
)

N = 1200
P_MIN = 1e-3


def _two_sample_chi2(a, b):
    """p-value that integer samples a and b come from one distribution (bins with < 10 pooled merged)."""
    a, b = np.asarray(a), np.asarray(b)
    values = np.union1d(a, b)
    ca = np.array([(a == v).sum() for v in values])
    cb = np.array([(b == v).sum() for v in values])
    # merge sparse bins from the left into their neighbour so every bin has >= 10 pooled counts
    rows_a, rows_b, acc_a, acc_b = [], [], 0, 0
    for x, y in zip(ca, cb):
        acc_a, acc_b = acc_a + x, acc_b + y
        if acc_a + acc_b >= 10:
            rows_a.append(acc_a)
            rows_b.append(acc_b)
            acc_a = acc_b = 0
    if acc_a + acc_b:
        if rows_a:
            rows_a[-1] += acc_a
            rows_b[-1] += acc_b
        else:
            rows_a, rows_b = [acc_a], [acc_b]
    if len(rows_a) < 2:
        return 1.0  # a single bin: both samples are the same constant
    return stats.chi2_contingency(np.array([rows_a, rows_b]))[1]


def _shape_stats(masks):
    """(count, rows touched, columns touched) per mask; masks (n, H, W) bool."""
    masks = np.asarray(masks)
    return masks.sum((1, 2)), masks.any(2).sum(1), masks.any(1).sum(1)


def _reference_masks(gen, target, n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([gen(target, rng) for _ in range(n)])


@pytest.mark.parametrize("grid,target", [((14, 14), 3), ((14, 14), 12), ((14, 14), 40), ((14, 14), 98), ((6, 10), 20)])
def test_counts_and_block_shapes_match_reference(grid, target):
    ref = _reference_masks(BlockMaskGenerator(grid), target, N, seed=1)
    fast = VectorizedBlockMaskGenerator(grid).generate(np.full(N, target), np.random.default_rng(2))
    assert fast.shape == (N,) + grid and fast.dtype == bool
    for name, x, y in zip(("count", "rows", "cols"), _shape_stats(ref), _shape_stats(fast)):
        p = _two_sample_chi2(x, y)
        assert p > P_MIN, f"grid {grid} target {target}: {name} histograms differ (p={p:.2e})"
    assert (fast.sum((1, 2)) <= target).all()


def test_patch_frequencies_match_reference():
    target, grid = 30, (14, 14)
    ref = _reference_masks(BlockMaskGenerator(grid), target, N, seed=3).reshape(N, -1)
    fast = VectorizedBlockMaskGenerator(grid).generate(np.full(N, target), np.random.default_rng(4)).reshape(N, -1)
    pa, pb = ref.mean(0), fast.mean(0)
    pooled = (pa + pb) / 2
    z = (pa - pb) / np.sqrt(pooled * (1 - pooled) * 2 / N + 1e-12)
    # 196 two-proportion z-tests: under equal distributions max |z| is ~3.5
    assert np.abs(z).max() < 5.0, f"per-patch masking frequency differs: max |z| = {np.abs(z).max():.2f}"


def test_control_different_aspect_range_is_rejected():
    """The histogram tests have power: blocks with aspect in [0.6, 1/0.6] instead of [0.3, 1/0.3] fail."""
    target, grid = 12, (14, 14)
    ref = _reference_masks(BlockMaskGenerator(grid), target, N, seed=5)
    wrong = VectorizedBlockMaskGenerator(grid, min_aspect=0.6).generate(np.full(N, target), np.random.default_rng(6))
    _, rows_ref, _ = _shape_stats(ref)
    _, rows_wrong, _ = _shape_stats(wrong)
    assert _two_sample_chi2(rows_ref, rows_wrong) < 1e-6


def test_stratified_targets_equal_reference_float32_arithmetic():
    rng = np.random.default_rng(7)
    for n_masked, n_patches in ((32, 196), (5, 49), (1, 196), (64, 256)):
        u = rng.random(n_masked)
        edges = mask_ratio_edges(n_masked, (0.1, 0.5))
        expected = [stratified_target(n_patches, edges[k], edges[k + 1], u[k]) for k in range(n_masked)]
        assert stratified_targets(n_masked, n_patches, (0.1, 0.5), u).tolist() == expected


def test_batch_masks_match_reference_distribution():
    n_crops, grid, batches = 64, 14, 25
    ref_counts, fast_counts, ref_nonempty, fast_nonempty = [], [], [], []
    rng_ref, rng_fast = np.random.default_rng(8), np.random.default_rng(9)
    gen = BlockMaskGenerator((grid, grid))
    for _ in range(batches):
        r = sample_batch_masks(n_crops, grid, 0.5, (0.1, 0.5), rng=rng_ref, generator=gen)
        f = sample_batch_masks_fast(n_crops, grid, 0.5, (0.1, 0.5), rng=rng_fast)
        assert f.shape == (n_crops, grid * grid) and f.dtype == torch.bool
        ref_counts += r.sum(1).tolist()
        fast_counts += f.sum(1).tolist()
        ref_nonempty.append(int(r.any(1).sum()))
        fast_nonempty.append(int(f.any(1).sum()))
        # at most floor(n * p) crops masked; the stratified targets bound the sorted counts
        assert fast_nonempty[-1] <= n_crops // 2
    assert _two_sample_chi2(ref_counts, fast_counts) > P_MIN
    assert _two_sample_chi2(ref_nonempty, fast_nonempty) > P_MIN
    # the masked crops' positions are shuffled: every row index gets masked sometimes
    assert np.mean(fast_nonempty) > 0.95 * n_crops / 2


def test_masks_are_reproducible_and_indices_weights_consistent():
    masking = FastBatchMasking((14, 14))
    a = masking(32, np.random.default_rng(10))
    b = masking(32, np.random.default_rng(10))
    assert torch.equal(a, b)
    idx, w = mask_indices_and_weights(a)
    assert torch.all(idx[1:] > idx[:-1])
    per_crop = torch.zeros(32).index_add_(0, idx // 196, w)
    masked = a.any(1)
    assert torch.allclose(per_crop[masked], torch.ones(int(masked.sum())))
    assert torch.all(per_crop[~masked] == 0)


def test_from_config_only_for_masked_methods():
    from flashdino.engine.config import build_config

    assert FastBatchMasking.from_config(build_config("simdino_vits16")) is None
    m = FastBatchMasking.from_config(build_config("simdinov2_vitb16"))
    assert m.grid == (14, 14) and m.n_patches == 196


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_global_crops=-1, grid=14), "n_global_crops"),
        (dict(n_global_crops=4, grid=14, probability=1.5), "probability"),
        (dict(n_global_crops=4, grid=14, ratio_min_max=(0.6, 0.5)), "ratio_min_max"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_batch_masks_fast(**kwargs)


def test_generator_rejects_bad_rng_and_targets():
    gen = VectorizedBlockMaskGenerator(7)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        gen.generate([3], rng=0)
    with pytest.raises(ValueError, match="targets"):
        gen.generate([-1], np.random.default_rng(0))

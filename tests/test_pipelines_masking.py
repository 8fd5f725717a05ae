"""iBOT block masking (spec 3.2, trap T13): draw-for-draw fidelity, statistics, shapes, indices and weights."""
import math
import random

import numpy as np
import pytest
import torch

from flashdino.pipelines.masking import (
    BatchMasking,
    BlockMaskGenerator,
    mask_indices_and_weights,
    sample_batch_masks,
)
from flashdino.pipelines.masking import _Draws  # the RNG adapter, to drive add_block directly

GRID = 14
P = GRID * GRID


# ------------------------------------------------------------------------------------------------
# An independent statement of the spec's pseudo-code, on Python's global `random`, with the masked
# cells kept as a set instead of an array.
# ------------------------------------------------------------------------------------------------


def _spec_block_mask(target, height=GRID, width=GRID, min_patches=4, max_patches=0.5 * P, lo=0.3, hi=1 / 0.3):
    cells = set()
    while len(cells) < target:
        budget = min(target - len(cells), max_patches)
        added = 0
        for _attempt in range(10):
            area = random.uniform(min_patches, budget)
            aspect = math.exp(random.uniform(math.log(lo), math.log(hi)))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if h >= height or w >= width:
                continue
            top = random.randint(0, height - h)
            left = random.randint(0, width - w)
            rect = {(r, c) for r in range(top, top + h) for c in range(left, left + w)}
            fresh = rect - cells
            if 0 < len(fresh) <= budget:
                cells |= fresh
                added = len(fresh)
                break
        if added == 0:
            break
    out = np.zeros((height, width), dtype=bool)
    for r, c in cells:
        out[r, c] = True
    return out


def _spec_batch_masks(n_crops, probability, ratio_min_max):
    """The reference collate's masking as the spec states it: torch float32 edges, Python RNG."""
    n_masked = int(n_crops * probability)
    edges = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    masks = []
    for k in range(n_masked):
        ratio = random.uniform(edges[k], edges[k + 1])  # a float32 0-d tensor: float32 arithmetic
        masks.append(torch.from_numpy(_spec_block_mask(int(P * ratio))))
    masks += [torch.zeros(GRID, GRID, dtype=torch.bool) for _ in range(n_crops - n_masked)]
    random.shuffle(masks)
    return torch.stack(masks).flatten(1)


def test_generator_reproduces_spec_loop_draw_for_draw():
    gen = BlockMaskGenerator((GRID, GRID))
    assert gen.max_num_patches == 98.0  # set explicitly (T13)
    for seed in range(40):
        for target in (0, 1, 2, 3, 5, 19, 40, 77, 98, 120, 196):
            random.seed(seed * 1000 + target)
            expected = _spec_block_mask(target)
            got = gen(target, random.Random(seed * 1000 + target))
            assert np.array_equal(got, expected), f"seed {seed} target {target}"


def test_batch_masks_reproduce_spec_collate_draw_for_draw():
    for seed in range(25):
        for n_crops, prob, ratios in ((16, 0.5, (0.1, 0.5)), (6, 0.5, (0.1, 0.5)), (10, 0.3, (0.05, 0.45)), (4, 1.0, (0.2, 0.2))):
            random.seed(seed)
            expected = _spec_batch_masks(n_crops, prob, ratios)
            got = sample_batch_masks(n_crops, (GRID, GRID), prob, ratios, rng=random.Random(seed))
            assert got.dtype == torch.bool and got.shape == (n_crops, P)
            assert torch.equal(got, expected), f"seed {seed}, n={n_crops}, p={prob}, ratios={ratios}"


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def test_masked_counts_never_exceed_target_and_usually_reach_it():
    gen = BlockMaskGenerator((GRID, GRID))
    rng = np.random.default_rng(0)
    # The recipe's targets: floor(196 * r) for r in [0.1, 0.5].
    for target in (19, 39, 58, 78, 98):
        counts = np.array([gen(target, rng).sum() for _ in range(150)])
        assert counts.max() <= target, target
        # Ten failed attempts in a row are rare at these sizes: the target is usually met exactly.
        assert (counts == target).mean() >= 0.8, (target, np.bincount(counts))
        assert counts.mean() >= 0.98 * target, (target, counts.mean())
    # Small targets: a block of 4 cannot fill a remaining budget of 1, so masks often end below
    # target (the spec's "masks can end with fewer patches than asked"), never above it.
    counts = np.array([gen(4, rng).sum() for _ in range(150)])
    assert counts.max() <= 4 and (counts < 4).any() and (counts == 4).mean() > 0.5
    assert gen(0, rng).sum() == 0


def test_batch_masks_stratified_ratios_and_random_positions():
    n_crops, prob, ratios = 16, 0.5, (0.1, 0.5)
    n_masked = int(n_crops * prob)
    edges = np.linspace(ratios[0], ratios[1], n_masked + 1)
    upper = np.floor(P * edges[1:] + 1e-6)  # largest target each stratum can ask for
    lower = np.floor(P * edges[:-1] - 1e-6)
    rng = np.random.default_rng(5)
    n_batches = 300
    position_hits = np.zeros(n_crops)
    reached_lower = 0
    for _ in range(n_batches):
        masks = sample_batch_masks(n_crops, GRID, prob, ratios, rng=rng)
        counts = masks.sum(1).numpy()
        position_hits += counts > 0
        assert (counts > 0).sum() <= n_masked
        top = np.sort(counts)[-n_masked:]  # one mask per stratum, in increasing order of ratio
        assert (top <= upper).all(), (top, upper)
        reached_lower += (top >= lower).sum()
    assert reached_lower >= 0.97 * n_batches * n_masked
    # Which crops are masked is random (shuffled): every position is masked about half the time.
    freq = position_hits / n_batches
    assert np.all(np.abs(freq - prob) < 5 * math.sqrt(prob * (1 - prob) / n_batches)), freq
    # Mean masked fraction over all crops ~ prob * mean ratio (slightly less: floor and shortfalls).
    masks = torch.cat([sample_batch_masks(n_crops, GRID, prob, ratios, rng=rng) for _ in range(100)])
    mean_fraction = masks.float().mean().item()
    assert prob * np.mean(ratios) - 0.01 < mean_fraction <= prob * np.mean(ratios)


def test_single_blocks_respect_area_and_aspect_limits():
    gen = BlockMaskGenerator((GRID, GRID))
    draws = _Draws(np.random.default_rng(11))
    shapes, edges_touched = [], set()
    for _ in range(1500):
        mask = np.zeros((GRID, GRID), dtype=bool)
        added, rect = gen.add_block(mask, 98, draws)
        assert added > 0 and rect is not None
        top, left, h, w = rect
        assert mask.sum() == h * w == added and mask[top : top + h, left : left + w].all()
        assert 1 <= h < GRID and 1 <= w < GRID
        # h, w are rounded from sqrt(area*aspect), sqrt(area/aspect) with area in [4, 98] and
        # aspect in [0.3, 1/0.3]: the unrounded box must be reachable from (h, w).
        assert (h + 0.5) * (w + 0.5) >= 4 and (h - 0.5) * (w - 0.5) <= 98
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 + 1e-9 and (h + 0.5) / max(w - 0.5, 1e-9) >= 0.3 - 1e-9
        shapes.append((h, w))
        edges_touched.update({"top"} if top == 0 else set())
        edges_touched.update({"bottom"} if top + h == GRID else set())
        edges_touched.update({"left"} if left == 0 else set())
        edges_touched.update({"right"} if left + w == GRID else set())
    # Inclusive randint: blocks reach every border of the grid.
    assert edges_touched == {"top", "bottom", "left", "right"}
    log_aspect = np.log([h / w for h, w in shapes])
    assert abs(log_aspect.mean()) < 0.05  # symmetric in log-aspect
    assert log_aspect.max() > math.log(2.5) and log_aspect.min() < -math.log(2.5)  # extremes are used


def test_budget_is_capped_at_max_num_patches():
    gen = BlockMaskGenerator((GRID, GRID))
    budgets = []
    original = gen.add_block

    def spy(mask, budget, draws):
        budgets.append(budget)
        return original(mask, budget, draws)

    gen.add_block = spy
    mask = gen(180, np.random.default_rng(2))
    assert max(budgets) == 98.0 and mask.sum() <= 180
    assert BlockMaskGenerator((8, 6)).max_num_patches == 24.0
    assert BlockMaskGenerator((14, 14), max_num_patches=30).max_num_patches == 30


def test_numpy_rng_is_deterministic_and_non_square_grids_work():
    a = sample_batch_masks(8, (6, 10), rng=np.random.default_rng(3))
    b = sample_batch_masks(8, (6, 10), rng=np.random.default_rng(3))
    c = sample_batch_masks(8, (6, 10), rng=np.random.default_rng(4))
    assert a.shape == (8, 60) and torch.equal(a, b) and not torch.equal(a, c)
    masking = BatchMasking(grid=(6, 10))
    assert torch.equal(masking(8, np.random.default_rng(3)), a)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="rng"):
        BlockMaskGenerator()(10, rng=123)
    with pytest.raises(ValueError, match="probability"):
        sample_batch_masks(4, 14, probability=1.5, rng=random.Random(0))
    with pytest.raises(ValueError, match="ratio_min_max"):
        sample_batch_masks(4, 14, ratio_min_max=(0.5, 0.1), rng=random.Random(0))
    with pytest.raises(ValueError, match="grid"):
        sample_batch_masks(4, 14, rng=random.Random(0), generator=BlockMaskGenerator((7, 7)))
    with pytest.raises(TypeError, match="bool"):
        mask_indices_and_weights(torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------
# Indices and weights
# ------------------------------------------------------------------------------------------------


def test_indices_and_weights_spec_example():
    # Spec section 8 (cosine patch loss): 3 crops x 3 patches.
    masks = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    idx, w = mask_indices_and_weights(masks)
    assert idx.tolist() == [0, 1, 7, 8] and idx.dtype == torch.long
    assert w.dtype == torch.float32 and w.tolist() == [0.5, 0.5, 0.5, 0.5]


def test_indices_and_weights_match_float64_loop():
    rng = np.random.default_rng(8)
    for _ in range(20):
        masks = sample_batch_masks(12, GRID, rng=rng)
        idx, w = mask_indices_and_weights(masks)
        m = masks.numpy()
        exp_idx, exp_w = [], []
        for i in range(m.shape[0]):
            n_i = max(int(m[i].sum()), 1)
            for j in range(m.shape[1]):
                if m[i, j]:
                    exp_idx.append(i * m.shape[1] + j)
                    exp_w.append(1.0 / n_i)
        assert idx.tolist() == exp_idx
        assert np.all(np.diff(idx.numpy()) > 0)
        np.testing.assert_allclose(w.numpy(), np.array(exp_w), rtol=1e-7)
        # Each masked crop's weights sum to 1, so the total is the number of masked crops.
        crop_of = idx // P
        sums = torch.zeros(12, dtype=torch.float64).index_add_(0, crop_of, w.double())
        nonempty = m.any(1)
        np.testing.assert_allclose(sums.numpy()[nonempty], 1.0, rtol=1e-6)
        assert np.all(sums.numpy()[~nonempty] == 0)


def test_stratified_targets_use_float32_like_the_reference():
    # Near the u where P * r crosses an integer, float32 and float64 can floor differently; the
    # reference evaluates with float32 tensors (its linspace edges), so must we.
    from flashdino.pipelines.masking import mask_ratio_edges, stratified_target

    edges_t = torch.linspace(0.1, 0.5, 9)
    edges = mask_ratio_edges(8, (0.1, 0.5))
    assert edges.dtype == np.float32 and np.array_equal(edges, edges_t.numpy())
    differs_from_float64 = 0
    checked = 0
    for k in range(8):
        a, b = float(edges_t[k]), float(edges_t[k + 1])
        for m in range(math.ceil(P * a), math.floor(P * b) + 1):
            u_star = (m / P - a) / (b - a)
            for step in range(-30, 31):
                u = min(max(u_star + step * 3e-8, 0.0), 1.0 - 1e-12)
                reference = int(P * (edges_t[k] + (edges_t[k + 1] - edges_t[k]) * u))  # 0-d float32 tensors
                assert stratified_target(P, edges[k], edges[k + 1], u) == reference, (k, m, u)
                differs_from_float64 += int(P * (a + (b - a) * u)) != reference
                checked += 1
    assert checked > 1000 and differs_from_float64 > 0  # the check can tell float32 from float64

"""Real 2-process gloo runs: reduce_cov coding rate (T15), center update and Sinkhorn across ranks.

Each rank takes its slice of one shared input, runs the distributed objective and saves its
outputs; the test process compares them with the single-process computation on the concatenated
rows. Gradient convention (T15, documented in coding_rate): every rank computes the same global R,
and rank r receives world_size * dR/dZ_r for its own rows Z_r; DDP's gradient averaging then gives
the true gradient of R.
"""
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from flashdino.engine.objectives import coding_rate, simdino_loss, sinkhorn_knopp, update_center

from _ranks import free_port, spawn_ranks

WORLD = 2
EPS = 0.1
# name -> (shape of the concatenated input, view weights for the backward). Shapes are
# (G, N*B, p) or (N*B, p): N*B < p takes the row-gather path, N*B >= p the covariance all-reduce.
CODING_RATE_CASES = {
    "gather_rows_batched": (2, 6, 16),
    "gather_rows_2d": (6, 16),
    "covariance_batched": (2, 20, 8),
    "covariance_square": (2, 8, 8),
}
# Row counts per rank for the Sinkhorn / center inputs (uneven, and one rank empty).
ROW_SPLITS = {"uneven": (3, 5), "one_empty": (4, 0)}



def _rank_rows(x, rank, splits):
    start = sum(splits[:rank])
    return x[start:start + splits[rank]]


def _worker(rank, port, folder):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        inputs = torch.load(os.path.join(folder, "inputs.pt"))
        out = {}
        for name, (z_all, view_weights) in inputs["coding_rate"].items():
            b = z_all.shape[-2] // WORLD
            z = z_all[..., rank * b:(rank + 1) * b, :].clone().requires_grad_()
            rate = coding_rate(z, EPS, world_size=WORLD, reduce_cov=True)
            (rate * view_weights).sum().backward()
            out[name] = (rate.detach(), z.grad)
        s_all, t_all, n_crops = inputs["simdino"]
        b = t_all.shape[0] // 2 // WORLD
        s = s_all.view(n_crops, WORLD, b, -1)[:, rank].reshape(n_crops * b, -1)
        t = t_all.view(2, WORLD, b, -1)[:, rank].reshape(2 * b, -1)
        out["simdino"] = torch.stack(simdino_loss(s, t, n_crops, eps=EPS, world_size=WORLD, reduce_cov=True))
        logits, center = inputs["logits"], inputs["center"]
        for split_name, splits in ROW_SPLITS.items():
            rows = _rank_rows(logits, rank, splits)
            out[f"sinkhorn_{split_name}"] = sinkhorn_knopp(rows, 0.05, n_iterations=3)
            out[f"center_{split_name}"] = update_center(center, rows, momentum=0.8)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Inputs (float64, so the comparison is tight) and the per-rank outputs of one 2-process run."""
    folder = str(tmp_path_factory.mktemp("objectives_gloo"))
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"[seed] distributed objectives: {seed}")
    g = torch.Generator().manual_seed(seed)
    coding_inputs = {}
    for name, shape in CODING_RATE_CASES.items():
        z = torch.randn(*shape, generator=g, dtype=torch.float64)
        z = z / z.norm(dim=-1, keepdim=True)
        weights = torch.tensor([1.0, -0.5], dtype=torch.float64)[: shape[0]] if len(shape) == 3 else torch.tensor(1.0, dtype=torch.float64)
        coding_inputs[name] = (z, weights)
    n_crops, b, p = 3, 4, 12
    s = torch.randn(n_crops * WORLD * b, p, generator=g, dtype=torch.float64)
    t = torch.randn(2 * WORLD * b, p, generator=g, dtype=torch.float64)
    inputs = {
        "coding_rate": coding_inputs,
        "simdino": (s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True), n_crops),
        "logits": torch.randn(8, 6, generator=g, dtype=torch.float64),
        "center": torch.randn(6, generator=g, dtype=torch.float64) * 0.1,
    }
    torch.save(inputs, os.path.join(folder, "inputs.pt"))
    spawn_ranks(_worker, (free_port(), folder), nprocs=WORLD)
    outputs = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(WORLD)]
    return inputs, outputs


@pytest.mark.parametrize("name", list(CODING_RATE_CASES))
def test_reduce_cov_equals_single_process_on_concatenated_batch(run, name):
    inputs, outputs = run
    z_all, view_weights = inputs["coding_rate"][name]
    z_single = z_all.clone().requires_grad_()
    # One process holding all N*B rows, no reduction: alpha = p / (N*B * eps) is the same.
    rate = coding_rate(z_single, EPS, world_size=1)
    (rate * view_weights).sum().backward()
    b = z_all.shape[-2] // WORLD
    for r, out in enumerate(outputs):
        rank_rate, rank_grad = out[name]
        torch.testing.assert_close(rank_rate, rate.detach(), rtol=1e-12, atol=1e-12)
        expected = WORLD * z_single.grad[..., r * b:(r + 1) * b, :]
        torch.testing.assert_close(rank_grad, expected, rtol=1e-10, atol=1e-12)
    # DDP view: the rank-averaged gradient of a shared parameter equals the single-process one.
    mean_grad = torch.cat([out[name][1] for out in outputs], dim=-2) / WORLD
    torch.testing.assert_close(mean_grad, z_single.grad, rtol=1e-10, atol=1e-12)


def test_simdino_reduce_cov_expa_is_the_global_coding_rate(run):
    inputs, outputs = run
    s_all, t_all, n_crops = inputs["simdino"]
    _, _, expa_single = simdino_loss(s_all, t_all, n_crops, eps=EPS, world_size=1)
    comps = []
    for out in outputs:
        _, comp, expa = out["simdino"]
        torch.testing.assert_close(expa, expa_single, rtol=1e-12, atol=1e-12)
        comps.append(comp)
    # The compression term stays per rank; its rank mean is the single-process comp.
    _, comp_single, _ = simdino_loss(s_all, t_all, n_crops, eps=EPS)
    torch.testing.assert_close(torch.stack(comps).mean(), comp_single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split_name", list(ROW_SPLITS))
def test_sinkhorn_and_center_equal_single_process(run, split_name):
    inputs, outputs = run
    logits = inputs["logits"][: sum(ROW_SPLITS[split_name])]  # the rows the ranks held, concatenated
    center = inputs["center"]
    single_q = sinkhorn_knopp(logits, 0.05, n_iterations=3)
    gathered = torch.cat([out[f"sinkhorn_{split_name}"] for out in outputs])
    torch.testing.assert_close(gathered, single_q, rtol=1e-12, atol=1e-14)
    single_center = update_center(center, logits, momentum=0.8)
    for out in outputs:
        torch.testing.assert_close(out[f"center_{split_name}"], single_center, rtol=1e-12, atol=1e-14)

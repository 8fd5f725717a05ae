"""Kernel collectives on 2 CPU ranks (gloo): reduce_cov coding rate, Sinkhorn, DINO center update.

Each multi-rank result must equal the single-process computation on the concatenated batch
(for gradients: N × the single-process gradient of the rank's rows, spec trap T15).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from _ranks import spawn_ranks

WORLD = 2


def _worker(rank, init_file, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from flashdino.kernels.centering import dino_loss_fused, sinkhorn_knopp_fused
        from flashdino.kernels.coding_rate import coding_rate_fused

        data = torch.load(os.path.join(out_dir, "inputs.pt"))
        out = {}
        for name in ("gather", "cov"):
            z = data[name][rank].clone().requires_grad_()
            rate = coding_rate_fused(z, eps=0.1, world_size=WORLD, reduce_cov=True)
            rate.sum().backward()
            out[name] = (rate.detach(), z.grad)
        out["sinkhorn"] = sinkhorn_knopp_fused(data["logits"][rank], 0.05, 3)
        out["center"] = dino_loss_fused(data["student"][rank], data["teacher"][rank], data["center"], 3)[1]
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_collectives_match_single_process():
    gen = torch.Generator().manual_seed(0)
    data = {
        "gather": torch.randn(WORLD, 2, 5, 24, generator=gen),   # N·B = 10 < p = 24: rows gathered
        "cov": torch.randn(WORLD, 2, 20, 16, generator=gen),     # N·B = 40 ≥ p = 16: covariance summed
        "logits": torch.randn(WORLD, 6, 300, generator=gen),
        "student": torch.randn(WORLD, 3 * 4, 50, generator=gen),
        "teacher": torch.randn(WORLD, 2 * 4, 50, generator=gen),
        "center": 0.1 * torch.randn(50, generator=gen),
    }
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(data, os.path.join(tmp, "inputs.pt"))
        spawn_ranks(_worker, (os.path.join(tmp, "init"), tmp), nprocs=WORLD)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    from flashdino.kernels.centering import sinkhorn_knopp_fused
    from flashdino.kernels.coding_rate import coding_rate_fused

    for name in ("gather", "cov"):
        z_all = torch.cat(list(data[name]), dim=1).double().requires_grad_()  # (G, N·B, p)
        ref = coding_rate_fused(z_all, eps=0.1, world_size=1)  # α = p/(N·B·eps): the same global R
        ref.sum().backward()
        b = data[name].shape[2]
        for r, res in enumerate(results):
            rate, grad = res[name]
            assert torch.allclose(rate.double(), ref.detach(), rtol=1e-5), name
            assert torch.allclose(grad.double(), WORLD * z_all.grad[:, r * b:(r + 1) * b], rtol=1e-4, atol=1e-6), name
    probs = sinkhorn_knopp_fused(torch.cat(list(data["logits"])).double(), 0.05, 3)
    for r, res in enumerate(results):
        assert torch.allclose(res["sinkhorn"].double(), probs[r * 6:(r + 1) * 6], rtol=5e-5, atol=1e-12)
    center = 0.9 * data["center"] + 0.1 * torch.cat(list(data["teacher"])).mean(0)
    for res in results:
        assert torch.allclose(res["center"], center, atol=1e-6)


if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytestmark = pytest.mark.skip(reason="torch.distributed with gloo is not available")

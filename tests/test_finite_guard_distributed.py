"""A NaN seen by one rank stops every rank at the same check (no rank left hanging in a collective)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashdino.engine.finite_guard import FiniteGuard, NonFiniteLossError

from _ranks import free_port, spawn_ranks



def _worker(rank, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        guard = FiniteGuard()
        outcome = "ok"
        for step in range(4):
            bad = rank == 1 and step == 2
            guard.record(step, {"total_loss": torch.tensor(float("nan") if bad else 1.0)})
            try:
                guard.check()
            except NonFiniteLossError as exc:
                outcome = (exc.step, step, exc.terms[0])
                break
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


def test_nan_on_one_rank_stops_all_ranks():
    results = mp.Manager().dict()
    spawn_ranks(_worker, (free_port(), results), nprocs=2)
    # both ranks stop at the same check, naming step 2; rank 0 says the NaN came from another rank
    assert results[1] == (2, 2, "total_loss")
    assert results[0] == (2, 2, "reported by another rank")

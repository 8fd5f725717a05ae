"""Helpers for the tests that run several processes: a free loopback port, and a spawn with a deadline.

A hung rank (a collective one rank never reaches, or a C++-extension build waiting on a stale lock,
see engine/runtime/build_locks.py) would otherwise hold the suite until CI's own limit, saying
nothing about where it stopped.
"""
import socket
import time

import pytest
import torch.multiprocessing as mp

SPAWN_TIMEOUT_S = 600.0  # the slowest multi-process test takes a few minutes on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, args, nprocs: int, timeout_s: float = SPAWN_TIMEOUT_S) -> None:
    """``mp.spawn(fn, args, nprocs)``; a rank's exception re-raises as with ``join=True``, and ranks
    still running after `timeout_s` are killed and the test fails, naming them."""
    context = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                p.join(timeout=10)  # reap it
            pytest.fail(f"{fn.__name__}: rank(s) {alive} of {nprocs} still running after {timeout_s:.0f} s, killed "
                        f"(a collective some rank never reached, or a build waiting on a stale lock)")

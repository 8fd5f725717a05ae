"""The multi-process tests' spawn fails, and kills the ranks, at its deadline instead of hanging."""
import os
import time

import pytest

from _ranks import spawn_ranks


def _rank_1_hangs(rank, folder):
    with open(os.path.join(folder, f"pid{rank}"), "w") as fh:
        fh.write(str(os.getpid()))
    if rank == 1:
        time.sleep(3600)


def _rank_1_raises(rank):
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_hung_rank_fails_the_test_and_is_killed(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"rank\(s\) \[1\] of 2 still running after 5 s"):
        spawn_ranks(_rank_1_hangs, (str(tmp_path),), nprocs=2, timeout_s=5)
    assert time.monotonic() - t0 < 60
    pid = int((tmp_path / "pid1").read_text())
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_a_rank_exception_still_surfaces():
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        spawn_ranks(_rank_1_raises, (), nprocs=2, timeout_s=60)

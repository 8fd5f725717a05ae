"""One run per output folder: an exclusive advisory lock (``flock``) on ``output_dir/.flashdino.lock``.

Two runs writing one folder (the same job launched twice, a requeued job whose first instance still
runs) would interleave checkpoints and metrics, and each would resume from the other's steps. The
lock is held by the main process for the run's life; the kernel releases it when that process ends,
however it ends, so a killed run leaves no stale lock. The file names its holder (pid, host, start
time) for the error message of the run that finds it taken. Within one process the lock is
re-entrant (a resumed Trainer built while an earlier one is still referenced, as tests do).
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from typing import Dict, List

from .checkpoint import CheckpointError

LOCK_NAME = ".flashdino.lock"
_held: Dict[str, List] = {}  # real path of the folder -> [file descriptor, holders in this process]


class RunLockedError(CheckpointError):
    """Another process holds the output folder."""


def acquire(output_dir: str) -> str:
    """Take the folder's lock (or join this process's hold on it); returns the key for :func:`release`."""
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held:
        _held[key][1] += 1
        return key
    fd = os.open(os.path.join(key, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunLockedError(f"train.output_dir '{output_dir}' is in use by another flashdino run ({holder}); "
                             f"wait for it to end, or choose another train.output_dir") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        # A filesystem without locks (some network mounts): run unguarded, and say so.
        print(f"[flashdino] warning: cannot lock '{output_dir}' ({exc.strerror}); nothing stops a second run "
              f"from writing into it", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
    _held[key] = [fd, 1]
    return key


def release(key: str) -> None:
    """Leave this holder's share of the lock; the last one in the process unlocks the folder."""
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the descriptor drops the flock

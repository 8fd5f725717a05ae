"""Stale lock files of torch's C++-extension builds, named before DeepSpeed starts.

On a CPU (gloo) run DeepSpeed JIT-builds its shared-memory communication op through
``torch.utils.cpp_extension``, which holds ``<build dir>/<extension>/lock`` while it compiles. In
torch 2.11 (the GPU image's) that lock is a ``FileBaton``: the file's existence blocks, and every
build of the extension waits on it forever, without a word, when the file outlived its builder: a
build that was killed, or a build by torch 2.14 in the same cache folder (2.14 holds an OS advisory
lock on the file, which dies with its holder, and leaves the file in place after every build; there
an old lock file is normal, and nothing is said). We cannot tell a dead builder's lock from a live
one's, so an old lock is named, not removed.
"""
from __future__ import annotations

import glob
import os
import sys
import time
from typing import Dict, List, Optional

STALE_AFTER_S = 600.0  # a build of DeepSpeed's CPU op takes about a minute on 2 cores
_reported: set = set()  # once per lock and process: a run may build several DeepSpeed engines


def extension_build_root() -> str:
    """Where torch builds C++ extensions: ``TORCH_EXTENSIONS_DIR``, else its default cache folder."""
    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def lock_files_block_builds() -> bool:
    """Whether this torch's extension builds wait while a lock file merely exists (``FileBaton``)."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton")


def _stale_lock_ages(root: Optional[str], now: float, stale_after_s: float) -> Dict[str, float]:
    """Age in seconds of each lock file under the build root older than `stale_after_s`, by path."""
    root = root or extension_build_root()
    locks = glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))
    ages = {}
    for path in locks:
        try:
            age = now - os.path.getmtime(path)
        except FileNotFoundError:  # a live build released it meanwhile
            continue
        if age > stale_after_s:
            ages[path] = age
    return dict(sorted(ages.items()))


def stale_build_locks(root: Optional[str] = None, now: Optional[float] = None,
                      stale_after_s: float = STALE_AFTER_S) -> List[str]:
    """Lock files under the build root (``<root>/<python_cuda>/<ext>/lock``, or ``<root>/<ext>/lock``
    with ``TORCH_EXTENSIONS_DIR``) older than `stale_after_s`."""
    return list(_stale_lock_ages(root, time.time() if now is None else now, stale_after_s))


def warn_stale_build_locks(root: Optional[str] = None, now: Optional[float] = None) -> List[str]:
    """Print one warning per stale lock not yet reported by this process (with how to clear it);
    returns the paths of all stale locks. Says nothing where lock files do not block builds."""
    if not lock_files_block_builds():
        return []
    ages = _stale_lock_ages(root, time.time() if now is None else now, STALE_AFTER_S)
    for path, age_s in ages.items():
        if path in _reported:
            continue
        _reported.add(path)
        extension = os.path.basename(os.path.dirname(path))
        print(f"[flashdino] warning: {path} is {age_s / 60:.0f} minutes old. A killed C++-extension build, or "
              f"any build by torch >= 2.14, leaves this lock behind, and this torch then waits on it forever when "
              f"DeepSpeed builds {extension!r}. If no other process is building it, delete the file: rm {path}",
              file=sys.stderr)
    return list(ages)

"""Stale C++-extension build locks are named (a killed build's lock hangs DeepSpeed's next build)."""
import os
import time

import pytest

from flashdino.engine.runtime import build_locks
from flashdino.engine.runtime.build_locks import (
    STALE_AFTER_S,
    extension_build_root,
    stale_build_locks,
    warn_stale_build_locks,
)


def _lock(path, age_s, now):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    os.utime(path, (now - age_s, now - age_s))
    return str(path)


def test_only_old_locks_are_stale_in_both_layouts(tmp_path):
    now = time.time()
    default_layout = _lock(tmp_path / "py311_cu130" / "deepspeed_shm_comm" / "lock", 2 * STALE_AFTER_S, now)
    env_layout = _lock(tmp_path / "my_ext" / "lock", STALE_AFTER_S + 5, now)
    _lock(tmp_path / "py311_cu130" / "building_now" / "lock", STALE_AFTER_S / 10, now)
    (tmp_path / "py311_cu130" / "built" / "built.so").parent.mkdir(parents=True)
    (tmp_path / "py311_cu130" / "built" / "built.so").write_bytes(b"")
    assert stale_build_locks(str(tmp_path), now) == sorted([default_layout, env_layout])


@pytest.fixture
def blocking_locks(monkeypatch):
    """torch 2.11's FileBaton semantics, whatever torch runs the tests."""
    monkeypatch.setattr(build_locks, "lock_files_block_builds", lambda: True)


def test_warning_names_the_lock_its_extension_and_the_fix(tmp_path, capsys, blocking_locks):
    now = time.time()
    lock = _lock(tmp_path / "py311_cu130" / "deepspeed_shm_comm" / "lock", 3600, now)
    assert warn_stale_build_locks(str(tmp_path), now) == [lock]
    err = capsys.readouterr().err
    assert "60 minutes old" in err and "'deepspeed_shm_comm'" in err and f"rm {lock}" in err
    assert warn_stale_build_locks(str(tmp_path), now) == [lock]  # still stale, reported once
    assert capsys.readouterr().err == ""


def test_no_locks_no_warning(tmp_path, capsys, blocking_locks):
    assert warn_stale_build_locks(str(tmp_path)) == []
    assert capsys.readouterr().err == ""


def test_old_lock_files_are_not_reported_where_they_do_not_block(tmp_path, capsys, monkeypatch):
    # torch 2.14's advisory lock leaves its file behind after every build: that is not a problem.
    monkeypatch.setattr(build_locks, "lock_files_block_builds", lambda: False)
    _lock(tmp_path / "py311_cu130" / "deepspeed_shm_comm" / "lock", 3600, time.time())
    assert warn_stale_build_locks(str(tmp_path)) == []
    assert capsys.readouterr().err == ""


def test_blocking_is_detected_from_the_lock_torch_builds_with():
    import inspect

    from torch.utils import cpp_extension

    source = inspect.getsource(cpp_extension)
    assert build_locks.lock_files_block_builds() == ("FileBaton(" in source)


def test_build_root_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension_build_root() == str(tmp_path)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    from torch.utils.cpp_extension import get_default_build_root

    assert extension_build_root() == get_default_build_root()

"""One run per output folder: a second process is refused with the holder named; a killed holder
leaves no stale lock; within one process the lock is re-entrant."""
import gc
import os
import signal
import subprocess
import sys

import pytest

from flashdino.engine import run_lock
from flashdino.engine.cli import main as cli_main
from flashdino.engine.trainer import Trainer

from test_trainer import TINY, tiny_config

HOLD = "import sys, time; from flashdino.engine import run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def _holder(folder):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path, capsys):
    child = _holder(tmp_path)
    try:
        with pytest.raises(run_lock.RunLockedError, match=f"in use by another flashdino run \\(pid {child.pid} on "):
            Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=1"))
        code = cli_main(["train", "--preset", "simdino_vits16", "--output-dir", str(tmp_path), *TINY,
                         "train.precision=fp32", "train.max_steps=1", "eval.after_train=false"])
        err = capsys.readouterr().err
        assert code == 2 and "in use by another flashdino run" in err and "Traceback" not in err
    finally:
        child.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel drops its lock
        child.wait()
    summary = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=1")).fit()
    assert summary["steps"] == 1


def test_the_lock_is_reentrant_in_one_process_and_released_with_the_last_trainer(tmp_path):
    first = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=1"))
    second = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=1"))
    probe = [sys.executable, "-c", "import sys; from flashdino.engine import run_lock; run_lock.acquire(sys.argv[1])",
             str(tmp_path)]
    del first
    gc.collect()
    assert subprocess.run(probe, capture_output=True).returncode != 0  # `second` still holds it
    del second
    gc.collect()
    assert subprocess.run(probe, capture_output=True).returncode == 0
    assert os.path.exists(tmp_path / run_lock.LOCK_NAME)

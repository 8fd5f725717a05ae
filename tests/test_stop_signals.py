"""A stop signal finishes the step, checkpoints and exits (engine/stop_signals.py, trainer, CLI).

* StopSignals records the first signal, re-delivers a second one to the previous handler, leaves an
  ignored signal ignored, installs nothing off the main thread and restores the handlers on exit;
* data workers (DataLoader's worker_init_fn, DALI's worker pickler) ignore the stop signals;
* the trainer stops at the step after the signal with a checkpoint there, skips the end-of-run
  callbacks, and resumes from that step; a signal met by the last step's save is still reported;
* `flashdino train` with data workers, its whole process group sent SIGINT / SIGTERM (a Ctrl-C, a
  scheduler's preemption): exit status 128 + signal, checkpoint at the last logged step, no traceback,
  and the same command resumes from there.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from flashdino.engine import checkpoint as ckpt
from flashdino.engine.stop_signals import StopSignals, exit_code
from flashdino.engine.trainer import Trainer

from test_trainer import TINY, tiny_config


@pytest.fixture
def recorded_usr1():
    """SIGUSR1 set to a recording handler for the test (restored after it)."""
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR1, previous)


def test_first_signal_is_recorded_second_goes_to_the_previous_handler(recorded_usr1):
    said = []
    with StopSignals(announce=said.append) as stop:
        assert stop.installed and stop.received is None and stop.number == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1" and stop.number == signal.SIGUSR1
        assert recorded_usr1 == [] and len(said) == 1 and "SIGUSR1 received" in said[0]
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one: the previous action, at once
        assert recorded_usr1 == [signal.SIGUSR1]
        assert stop.received == "SIGUSR1" and len(said) == 1
    os.kill(os.getpid(), signal.SIGUSR1)
    assert recorded_usr1 == [signal.SIGUSR1] * 2  # restored on exit


def test_handlers_are_restored_on_exit_and_ignored_signals_stay_ignored(recorded_usr1):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    with StopSignals(announce=lambda text: None) as stop:
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) not in (before[signal.SIGTERM], signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received is None
    assert {s: signal.getsignal(s) for s in before} == before


def test_nothing_is_installed_off_the_main_thread():
    result = {}

    def enter():
        with StopSignals() as stop:
            result["installed"] = stop.installed
            result["handler"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert result == {"installed": False, "handler": before}


def test_exit_code_is_the_shells_status_for_death_by_that_signal():
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        # What a shell reports for a child killed by the signal: 128 + its number. The child sets the
        # signal's default action first: started from a background shell job, it inherits SIGINT ignored.
        code = f"import os, signal; signal.signal(signal.{name}, signal.SIG_DFL); os.kill(os.getpid(), signal.{name})"
        child = subprocess.run([sys.executable, "-c", code])
        assert child.returncode == -getattr(signal, name)
        assert exit_code(name) == 128 + getattr(signal, name)


@pytest.mark.parametrize("setup", [
    "from flashdino.pipelines.worker_signals import ignore_stop_signals; ignore_stop_signals(3)",
    # DALI's spawned workers unpickle their callback with our pickler, which ignores the signals first
    "from flashdino.pipelines.dali.graph import WorkerPickler; "
    "assert WorkerPickler.loads(WorkerPickler.dumps({'a': [1, 2]})) == {'a': [1, 2]}",
])
def test_data_workers_ignore_the_stop_signals(setup):
    code = setup + "\nimport os, signal\nfor s in ('SIGTERM', 'SIGINT', 'SIGUSR1'):\n" \
                   "    os.kill(os.getpid(), getattr(signal, s))\nprint('alive')"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (child.returncode, child.stdout.strip()) == (0, "alive"), child.stderr


class SignalAt:
    """Sends this process `signum` from the log callback of step `step` (log_every=1)."""

    def __init__(self, step, signum=signal.SIGUSR1):
        self.step, self.signum, self.ended = step, signum, False

    def on_log(self, trainer, step, metrics, losses):
        if step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_end(self, trainer, summary):
        self.ended = True


def test_trainer_stops_after_the_step_checkpoints_and_resumes_there(tmp_path):
    previous = signal.getsignal(signal.SIGUSR1)
    hook = SignalAt(step=3)
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=8"), callbacks=[hook])
    summary = trainer.fit()
    assert (summary["steps"], summary["stop_signal"]) == (3, "SIGUSR1")
    assert summary["stopped_early"] == "SIGUSR1 received; stopped at step 3 of 8"
    assert not hook.ended  # no end-of-run evaluation for a run that is not finished
    assert signal.getsignal(signal.SIGUSR1) == previous
    state = ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))
    assert state["train_state"]["step"] == 3

    again = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=8"), callbacks=[SignalAt(step=-1)])
    assert again.state.step == 3
    summary = again.fit()
    assert (summary["steps"], summary["stop_signal"], summary["stopped_early"]) == (8, None, None)
    assert again.callbacks[0].ended


def test_a_signal_at_the_last_step_is_still_reported(tmp_path):
    hook = SignalAt(step=4)
    summary = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=4"), callbacks=[hook]).fit()
    assert (summary["steps"], summary["stop_signal"], summary["stopped_early"]) == (4, "SIGUSR1", None)
    assert not hook.ended
    assert ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))["train_state"]["step"] == 4


def test_handle_signals_false_leaves_them_to_the_host(tmp_path, recorded_usr1):
    hook = SignalAt(step=2)
    cfg = tiny_config(tmp_path, "simdino_vits16", "train.max_steps=4", "train.handle_signals=false")
    summary = Trainer(cfg, callbacks=[hook]).fit()
    assert recorded_usr1 == [signal.SIGUSR1]
    assert (summary["steps"], summary["stop_signal"]) == (4, None) and hook.ended


def _metrics_steps(path):
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line)["step"] for line in fh if line.strip().endswith("}")]


@pytest.mark.parametrize("pipeline,signame", [("torchvision", "SIGINT"), ("torchvision", "SIGTERM"), ("dali", "SIGINT")])
def test_flashdino_train_stops_on_a_signal_to_its_process_group_and_resumes(tmp_path, pipeline, signame):
    if pipeline == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith(("data.num_workers", "data.synthetic_size"))]
    command = [sys.executable, "-m", "flashdino.engine.cli", "train", "--preset", "simdino_vits16",
               "--output-dir", str(out), *overrides, "data.num_workers=2", "data.synthetic_size=4800",
               f"data.pipeline={pipeline}", "train.precision=fp32", "eval.after_train=false",
               "train.device=cpu"]  # the same run on a GPU machine: what is tested is the signal handling
    # Its own process group, as a terminal's foreground job or a scheduler's job step; SIGINT at its
    # default (a shell starts background jobs with it ignored, and the trainer leaves that alone).
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while len(_metrics_steps(out / "metrics.jsonl")) < 3:
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()[1][-3000:]
            time.sleep(0.2)
        os.killpg(child.pid, getattr(signal, signame))  # the workers get it too
        _, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == exit_code(signame), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    steps = _metrics_steps(out / "metrics.jsonl")
    stopped_at = ckpt.load_checkpoint(ckpt.find_latest(str(out)))["train_state"]["step"]
    assert stopped_at == steps[-1] >= 3 and f"stopped by {signame} at step {stopped_at} of 2400" in err

    resumed = subprocess.run(command + [f"train.max_steps={stopped_at + 2}"], capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out}" in resumed.stderr and f"at step {stopped_at}" in resumed.stderr
    assert _metrics_steps(out / "metrics.jsonl")[-1] == stopped_at + 2

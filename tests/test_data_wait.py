"""The time a run waits for its next batch: logged per window as `data_wait`, with one warning per run
when the input pipeline limits the speed (never for the first window: loader start, compile)."""
import time

from flashdino.engine.data_wait import DATA_BOUND_FRACTION, DataWaitMonitor
from flashdino.engine.trainer import Trainer

from test_trainer import _read_metrics, tiny_config


def test_monitor_warns_once_past_the_first_window_and_names_the_knobs():
    gpu = DataWaitMonitor(num_workers=4, pipeline="torchvision", on_gpu=True)
    gpu.add(0.9)
    assert gpu.end_window(1.0, 10) == (0.9, None)  # the first window holds the start-up
    gpu.add(0.2)
    assert gpu.end_window(1.0, 10) == (0.2, None)  # below the threshold
    gpu.add(0.5)
    fraction, warning = gpu.end_window(1.0, 10)
    assert fraction == 0.5 > DATA_BOUND_FRACTION
    assert "the last 10 steps waited for data 50% of the time" in warning
    assert "data.num_workers (now 4)" in warning and "data.pipeline=dali" in warning
    gpu.add(0.9)
    assert gpu.end_window(1.0, 10) == (0.9, None)  # once per run
    cpu = DataWaitMonitor(num_workers=2, pipeline="torchvision", on_gpu=False)
    for _ in range(2):
        cpu.add(0.8)
        fraction, warning = cpu.end_window(1.0, 5)
    assert "data.num_workers (now 2)" in warning and "dali" not in warning  # DALI's speed is on the GPU


class SlowLoader:
    """The trainer's loader, `delay` seconds slower per batch (a starved input pipeline)."""

    def __init__(self, loader, delay):
        self.loader, self.delay, self.dataset = loader, delay, loader.dataset

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


def test_a_starved_run_logs_its_waiting_and_warns_once(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=8", "train.log_every=2"))
    trainer.loader = SlowLoader(trainer.loader, delay=0.25)
    trainer.fit()
    waits = [r["data_wait"] for r in _read_metrics(tmp_path)]
    assert len(waits) == 4 and all(w > 0.5 for w in waits), waits
    err = capsys.readouterr().err
    assert err.count("waited for data") == 1 and "the last 2 steps waited for data" in err

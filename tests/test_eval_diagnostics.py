"""Collapse diagnostics: effective rank and per-dim std against float64 NumPy, and the warning."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flashdino.engine.diagnostics import CollapseMonitor, collapse_stats, effective_rank, singular_values


def numpy_effective_rank(x):
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(40, 16), (16, 40), (64, 64)])
def test_effective_rank_matches_numpy_svd(shape):
    x = torch.randn(*shape) * torch.linspace(0.1, 3.0, shape[1])  # uneven spectrum
    np.testing.assert_allclose(singular_values(x).numpy(), np.linalg.svd(x.double().numpy(), compute_uv=False),
                               rtol=1e-4, atol=1e-4)
    assert effective_rank(x) == pytest.approx(numpy_effective_rank(x.numpy()), rel=1e-4)


def test_effective_rank_limits():
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    assert effective_rank(q[:10]) == pytest.approx(10.0, rel=1e-6)  # orthonormal rows: full rank
    same = torch.randn(1, 20).repeat(50, 1)
    assert effective_rank(same) == pytest.approx(1.0, abs=1e-3)  # one direction
    assert effective_rank(torch.zeros(5, 4)) == 0.0


def test_collapse_stats_values():
    p, n = 64, 4000
    spread = collapse_stats(torch.randn(n, p))  # isotropic directions
    z = np.random.randn(n, p)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    assert spread["collapse/std_ratio"] == pytest.approx(1.0, abs=0.05)
    assert spread["collapse/rank_fraction"] > 0.9
    collapsed = collapse_stats(torch.randn(1, p).repeat(n, 1) + 1e-4 * torch.randn(n, p))
    assert collapsed["collapse/std_ratio"] < 0.01 and collapsed["collapse/effective_rank"] < 1.1
    x = torch.randn(300, 16) * torch.linspace(0.2, 2, 16)
    z = torch.nn.functional.normalize(x.double(), dim=1).numpy()
    stats = collapse_stats(x)
    assert stats["collapse/std_mean"] == pytest.approx(z.std(axis=0, ddof=1).mean(), rel=1e-5)
    assert stats["collapse/std_ratio"] == pytest.approx(z.std(axis=0, ddof=1).mean() * 4.0, rel=1e-5)
    assert stats["collapse/effective_rank"] == pytest.approx(numpy_effective_rank(z), rel=1e-4)
    with pytest.raises(ValueError, match="rows >= 2"):
        collapse_stats(torch.randn(1, 8))


class FakeLogger:
    def __init__(self):
        self.records, self.lines = [], []

    def log(self, step, metrics):
        self.records.append((step, dict(metrics)))

    def write(self, text):
        self.lines.append(text)


def test_monitor_logs_and_warns_once_per_episode():
    model = SimpleNamespace(last_teacher_output=None)
    trainer = SimpleNamespace(model=model, logger=FakeLogger())
    monitor = CollapseMonitor(warmup_logs=1)
    healthy = lambda: torch.randn(64, 32)  # noqa: E731
    collapsed = lambda: torch.ones(64, 32) + 1e-5 * torch.randn(64, 32)  # noqa: E731
    logged = []
    for step, out in enumerate([collapsed(), healthy(), collapsed(), collapsed(), healthy(), collapsed()], 1):
        model.last_teacher_output = out
        metrics = {"total_loss": -1.0}
        monitor.on_log(trainer, step * 10, metrics, None)
        logged.append(metrics)
    # the statistics join the step's own metrics record (the trainer logs it after the callbacks)
    assert all("collapse/effective_rank" in m and m["total_loss"] == -1.0 for m in logged)
    assert not trainer.logger.records
    warnings = [line for line in trainer.logger.lines if "WARNING" in line]
    # step 10 is inside the warm-up; 30 starts an episode, 40 continues it, 60 starts a new one
    assert len(warnings) == 2 and "step 30" in warnings[0] and "step 60" in warnings[1]
    assert any("recovered" in line and "step 50" in line for line in trainer.logger.lines)
    summary = {}
    monitor.on_train_end(trainer, summary)
    assert summary["collapse"]["warnings"] == 2 and summary["collapse"]["first_warning_step"] == 30
    assert summary["collapse"]["collapsed_at_end"] is True
    assert math.isfinite(summary["collapse"]["last"]["collapse/std_ratio"])

"""Callbacks a `flashdino train` run gets by default (evaluation, plots, diagnostics).

Each callback may define ``on_log(trainer, step, metrics, losses)`` and
``on_train_end(trainer, summary)``. The evaluation/plot callbacks are added by the evaluation
module when it is installed.
"""
from __future__ import annotations

from typing import List


def default_callbacks(cfg) -> List[object]:
    callbacks: List[object] = []
    try:
        from flashdino.engine.eval.callbacks import build_callbacks
    except ImportError as exc:
        if exc.name and exc.name.startswith("flashdino.engine.eval"):
            return callbacks
        raise
    callbacks.extend(build_callbacks(cfg))
    return callbacks

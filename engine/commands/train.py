"""Pretrain a ViT.

Examples:
  flashdino train                                   # the embedded default: demo preset on Fashion-MNIST
  flashdino train --preset simdino_vitb16 --data /data/imagenet/train
  flashdino train --config my_run.yaml optim.base_lr=0.001 data.batch_size=32

Configuration merge order: preset <- config file <- key=value overrides.
`flashdino config keys` lists every valid key; `flashdino config presets` the presets.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from flashdino.engine.config import build_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a named preset (flashdino config presets); default: demo when no --config is given")
    parser.add_argument("--config", help="a YAML or JSON config file")
    parser.add_argument("--data", help="dataset path: a class-folder tree, a folder of images or a file list "
                        "(default: the embedded Fashion-MNIST)")
    parser.add_argument("--output-dir", help="where checkpoints, metrics and plots go (train.output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.base_lr=0.001")
    # The deepspeed launcher appends --local_rank=N; the rank itself comes from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args) -> "Config":
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    preset = args.preset or (None if args.config else "demo")
    return build_config(preset, args.config, overrides)


def main(args) -> int:
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = config_from_args(args)
    from flashdino.engine.trainer import Trainer
    from flashdino.engine.distributed import shutdown
    from flashdino.engine.run_hooks import default_callbacks

    trainer = Trainer(cfg, callbacks=default_callbacks(cfg))
    summary = trainer.fit()
    print(json.dumps({k: v for k, v in summary.items() if k != "last_metrics"}, indent=None), file=sys.stderr)
    shutdown()  # a finished multi-process run leaves no live process group to the interpreter's exit
    if summary["stop_signal"]:  # checkpointed, not finished: the shell's status for death by that signal
        from flashdino.engine.stop_signals import exit_code

        return exit_code(summary["stop_signal"])
    return 0

"""Arguments and set-up shared by ``flashdino eval knn`` and ``flashdino eval linear``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict

import torch

AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a flashdino train checkpoint (checkpoint.pth)")
    parser.add_argument("--which", default="teacher", choices=("teacher", "student"),
                        help="which backbone to evaluate (spec 5: the teacher)")
    data = parser.add_argument_group("data (default: the held-out split of the data the checkpoint was trained on)")
    data.add_argument("--data", help="Fashion-MNIST folder, or a root with train/ and val/ class-folder trees")
    data.add_argument("--train-data", help="labeled train set: class-folder tree, labeled .txt list or Fashion-MNIST folder")
    data.add_argument("--val-data", help="labeled evaluation set (same kinds as --train-data)")
    data.add_argument("--eval-size", type=int, help="center-crop size (default: the run's eval.eval_size)")
    data.add_argument("--resize-size", type=int, help="shorter side before the crop (default: eval.resize_size; with "
                      "--eval-size alone, the run's resize-to-crop ratio applied to it, e.g. 224 -> 256)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding workers")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=tuple(AMP_DTYPES),
                        help="feature extraction precision: fp32 (v1 protocol, the default) or autocast fp16/bf16 "
                             "(v2 protocol)")
    parser.add_argument("--output", help="JSON file for the results (default: eval_<kind>.json beside the checkpoint)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available; use --device cpu")
    return device


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def write_json(path: str, record: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(record, fh, indent=2, default=str)
        fh.write("\n")


def default_output(checkpoint: str, kind: str, which: str) -> str:
    suffix = "" if which == "teacher" else f"_{which}"
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"eval_{kind}{suffix}.json")


def fail(message: str) -> int:
    """Print a one-line error (no traceback: the message says what is wrong) and return exit code 2."""
    print(f"flashdino: error: {message}", file=sys.stderr)
    return 2


def user_errors():
    """Exceptions that mean bad input (a path, a file, an argument), reported without a traceback."""
    from flashdino.engine.checkpoint import CheckpointError
    from flashdino.pipelines.datasets import DatasetError

    return (CheckpointError, DatasetError, FileNotFoundError, ValueError)

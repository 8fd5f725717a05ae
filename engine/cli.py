"""The `flashdino` command.

Sub-commands live in their own modules; each exposes ``add_arguments(parser)`` and ``main(args)``.
They are imported only when their parser is built, so a missing optional dependency of one
command (DALI, DeepSpeed) never breaks the others.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import List, Optional

# OSErrors about a path the user gave: printed as one line, not as a traceback.
USER_FIXABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR, errno.ENAMETOOLONG}

# (command path, module, help)
COMMANDS = [
    (("train",), "flashdino.engine.commands.train", "pretrain a ViT with SimDINO / SimDINOv2 / DINO / DINOv2"),
    (("config",), "flashdino.engine.commands.config", "print the merged configuration, the presets or all valid keys"),
    (("eval", "knn"), "flashdino.engine.eval.knn_cli", "weighted k-NN evaluation of a checkpoint's teacher backbone"),
    (("eval", "curve"), "flashdino.engine.eval.curve_cli", "k-NN learning curve over a run's step-numbered checkpoints"),
    (("eval", "linear"), "flashdino.engine.eval.linear_cli", "linear probe on frozen features of a checkpoint"),
    (("export",), "flashdino.engine.export", "export the teacher backbone as timm-compatible safetensors"),
    (("bench",), "flashdino.profiling.bench", "engine vs reference eager implementation: images/s, MFU, memory"),
    (("profile",), "flashdino.profiling.profile", "torch.profiler trace and top kernels of a few training steps"),
    (("parity",), "flashdino.profiling.parity", "engine vs reference: per-step losses, grad norms, parameter errors"),
    (("data", "bench"), "flashdino.pipelines.bench", "data pipeline throughput: DALI-GPU, DALI-CPU, torchvision"),
]


def _add_command(subparsers, name: str, module_name: str, help_text: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            return  # this command is not part of this installation
        parser = subparsers.add_parser(name, help=f"{help_text} [unavailable: {exc}]")
        parser.set_defaults(_unavailable=f"'{name}' is unavailable: {exc}")
        return
    parser = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    parser.set_defaults(_main=module.main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashdino", description="flashdino: fast SimDINO / SimDINOv2 pretraining")
    from flashdino.engine.version import __version__

    parser.add_argument("--version", action="version", version=f"flashdino {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups = {}
    for path, module_name, help_text in COMMANDS:
        if len(path) == 1:
            _add_command(top, path[0], module_name, help_text)
            continue
        group, name = path
        if group not in groups:
            group_parser = top.add_parser(group, help=f"{group} sub-commands")
            groups[group] = group_parser.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND")
            group_parser.set_defaults(_group_parser=group_parser)
        _add_command(groups[group], name, module_name, help_text)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"flashdino: {args._unavailable}", file=sys.stderr)
        return 2
    if not hasattr(args, "_main"):
        (getattr(args, "_group_parser", None) or parser).print_help()
        return 2
    from flashdino.engine.checkpoint import CheckpointError
    from flashdino.engine.config import ConfigError
    from flashdino.pipelines.datasets import DatasetError

    try:
        return args._main(args) or 0
    except ConfigError as exc:
        print(f"flashdino: configuration error: {exc}", file=sys.stderr)
        return 2
    except (DatasetError, CheckpointError, FileNotFoundError) as exc:
        # Bad input the user can fix: the message says what and how, a traceback would bury it.
        print(f"flashdino: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_FIXABLE_ERRNOS:
            raise
        # A path the user chose that cannot be written (read-only, full, a file where a folder goes).
        print(f"flashdino: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a Ctrl-C outside training, or a second one inside it (train aborts)
        print("flashdino: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Show configuration: the merged config of a run, the presets, or every valid key.

Examples:
  flashdino config show --preset simdinov2_vitb16 data.batch_size=32
  flashdino config presets
  flashdino config keys
"""
from __future__ import annotations

import argparse

from flashdino.engine.config import build_config, dump_yaml, valid_keys
from flashdino.engine.presets import list_presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=("show", "presets", "keys"))
    parser.add_argument("--preset")
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def main(args) -> int:
    if args.what == "presets":
        print("\n".join(list_presets()))
    elif args.what == "keys":
        print("\n".join(valid_keys()))
    else:
        print(dump_yaml(build_config(args.preset, args.config, args.overrides)), end="")
    return 0

"""The standard measurement set for profiling/results/ (meant for a GPU session).

    python -m flashdino.profiling.suite                              # every paper preset, fast paths on
    python -m flashdino.profiling.suite --presets simdino_vitb16 --skip profile
    python -m flashdino.profiling.suite --engine "runtime.compile=full" -- extra.key=value

For each preset: `flashdino parity` (5 steps), `flashdino bench` (20 timed steps), `flashdino profile`
(3 steps), all with the engine = preset + the fast-path overrides below; then the kernel
microbenchmarks and the latest-results table. Results go to the default folders under
profiling/results/. Exit status: the worst of the runs (1 = a parity or guard failure).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import List

PRESETS = ("simdino_vitb16", "simdinov2_vitb16", "simdino_vits16", "dino_vits16", "dinov2_vitb16")
FAST_PATHS = ("runtime.compile=block runtime.kernels.ema=triton runtime.kernels.coding_rate=triton "
              "runtime.kernels.centering=triton runtime.attention=sdpa")
STAGES = ("parity", "bench", "profile", "kernels")


def commands(presets: List[str], engine: List[str], extra: List[str], skip: List[str]) -> List[List[str]]:
    out = []
    for preset in presets:
        common = ["--preset", preset, *engine, *extra]
        if "parity" not in skip:
            out.append(["parity", *common, "--steps", "5"])
        if "bench" not in skip:
            out.append(["bench", *common, "--steps", "20", "--warmup", "3"])
        if "profile" not in skip:
            out.append(["profile", *common, "--steps", "3"])
    if "kernels" not in skip:
        out.append(["bench", "--kernels", "all"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="run the standard parity/bench/profile set and print the table")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--engine", default=FAST_PATHS, help="overrides that make the engine config")
    parser.add_argument("--skip", default="", help=f"comma-separated stages to skip: {', '.join(STAGES)}")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("extra", nargs="*", metavar="key=value", help="overrides for both sides (after --)")
    args = parser.parse_args(argv)
    skip = [s for s in args.skip.split(",") if s]
    bad = [s for s in skip if s not in STAGES]
    if bad:
        parser.error(f"unknown stage(s) {bad}; valid: {', '.join(STAGES)}")
    runs = commands([p for p in args.presets.split(",") if p], shlex.split(args.engine), args.extra, skip)
    from flashdino.engine.cli import main as cli_main
    from flashdino.profiling.report import latest_table

    worst = 0
    for run in runs:
        print("$ flashdino " + " ".join(shlex.quote(a) for a in run), file=sys.stderr, flush=True)
        if not args.dry_run:
            worst = max(worst, cli_main(run) or 0)
    if not args.dry_run:
        print(latest_table())
    return worst


if __name__ == "__main__":
    sys.exit(main())

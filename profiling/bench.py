"""Engine vs the reference eager implementation, side by side on identical inputs.

Examples:
  flashdino bench --preset simdino_vitb16 train.precision=bf16 runtime.compile=block
  flashdino bench --preset demo --steps 10 --warmup 2               # tiny, runs on a CPU
  flashdino bench --preset simdino_vitb16 --data pipeline --data-path /data/imagenet
  flashdino bench ... --baseline profiling/results/baselines/h100-simdino_vitb16.json   # regression guard
  flashdino bench --compare new/bench.json --baseline old/bench.json                   # guard only

The *engine* is the given config; the *reference* is the same config with runtime.compile=none,
eager kernels, math attention and no distributed wrapper (see flashdino.profiling.harness). Both
start from the same weights and see the same batches (synthetic on-device crops by default, or the
real data pipeline with --data pipeline, where the data wait is part of the step).

Reported per side: images/s, step time (median, p10, p90), MFU (FLOPs counted with
torch.utils.flop_counter on one reference step; peak = the GPU's datasheet dense peak for the run's
matmul dtype, or on a CPU the matmul ceiling measured in this run), peak memory, compile warm-up
time, a per-phase breakdown (CUDA events / wall clock on the CPU), and the speedup. Writes
bench.json, bench.md and bench.png to --out.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import torch

from . import env, harness
from .ceilings import matmul_ceiling_for, measure_ceilings
from .flops import analytic_step_flops, count_step_flops, datasheet_peak, peak_dtype
from .ranges import PhaseTimer, phase
from .timing import StepClock, summarize

SIDES = ("engine", "reference")
DEFAULT_RESULTS = os.path.join(os.path.dirname(os.path.realpath(__file__)), "results")


# ------------------------------------------------------------------------------------------
# measuring one side
# ------------------------------------------------------------------------------------------


def _mib(n_bytes: Optional[int]) -> Optional[float]:
    return None if n_bytes is None else n_bytes / 2 ** 20


def _batches(trainer, cfg, data: str, pool: int, seed: int) -> Iterator[Dict[str, Any]]:
    if data == "synthetic":
        return harness.synthetic_batches(cfg, trainer.device, pool=pool, seed=seed)
    return harness.loader_batches(trainer)


def _step(trainer, batches: Iterator[Dict[str, Any]], seed: int):
    with phase("data_wait"):
        batch = next(batches)
    harness.seed_step(seed, trainer.state.step)
    return harness.run_step(trainer, batch)


def measure(trainer, cfg, *, data: str, steps: int, warmup: int, phase_steps: int, pool: int, seed: int) -> Dict[str, Any]:
    """Warm up (compile happens here), time `steps` steps, then `phase_steps` steps with per-phase timing."""
    device = trainer.device
    batches = _batches(trainer, cfg, data, pool, seed)
    images = cfg.data.batch_size

    t0 = time.perf_counter()
    first_step_s = None
    for i in range(warmup):
        _step(trainer, batches, seed)
        harness.synchronize(device)
        if i == 0:
            first_step_s = time.perf_counter() - t0
    warmup_s = time.perf_counter() - t0
    recompiles_before = getattr(trainer, "recompiles_after_warmup", 0)

    clock = StepClock(device)
    wall0 = time.perf_counter()
    clock.mark()
    losses = None
    for _ in range(steps):
        losses = _step(trainer, batches, seed)
        clock.mark()
    times = clock.durations_ms()
    harness.synchronize(device)
    wall_s = time.perf_counter() - wall0
    # Graphs compiled inside the timed steps make their times (and p90) a compile measurement.
    recompiles_timed = getattr(trainer, "recompiles_after_warmup", 0) - recompiles_before

    phases: Dict[str, Any] = {}
    other_ms = None
    if phase_steps:
        phase_clock = StepClock(device)
        with PhaseTimer(device) as timer:
            phase_clock.mark()
            for _ in range(phase_steps):
                losses = _step(trainer, batches, seed)
                phase_clock.mark()
        step_ms = sum(phase_clock.durations_ms()) / phase_steps
        top_level = 0.0
        for name, s in timer.summary().items():
            phases[name] = {"ms_per_step": s["total_ms"] / phase_steps, "share": s["total_ms"] / phase_steps / step_ms}
            top_level += s["top_level_ms"] / phase_steps
        other_ms = step_ms - top_level  # nested phases are inside their parent's time already

    total_s = sum(times) / 1e3
    compile_report = getattr(trainer, "compile_report", None)  # set by the trainer after its warm-up step
    attention = getattr(trainer, "attention_report", None)
    final = {k: float(v.detach()) for k, v in (losses or {}).items() if torch.is_tensor(v) and v.ndim == 0 and k.endswith("loss")}
    out = {
        "images_per_s": images * steps / total_s,
        "images_per_s_wall": images * steps / wall_s,
        "step_ms": summarize(times),
        "step_times_ms": times,
        "warmup_s": warmup_s,
        "first_step_s": first_step_s,
        "phases": phases,
        "phase_other_ms": other_ms,
        "final_losses": final,
        "losses_finite": all(math.isfinite(v) for v in final.values()),
        "compile": dataclasses.asdict(compile_report) if dataclasses.is_dataclass(compile_report) else None,
        "recompiles_in_timed_steps": recompiles_timed,
        "attention": attention.describe() if hasattr(attention, "describe") else None,
    }
    if device.type == "cuda":
        out["peak_mem_mib"] = {"allocated": _mib(torch.cuda.max_memory_allocated(device)),
                               "reserved": _mib(torch.cuda.max_memory_reserved(device))}
    else:
        out["peak_mem_mib"] = {"allocated": None, "reserved": None,
                               "note": "no allocator statistics on the CPU"}
    return out


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


def variant_config(engine_cfg, overrides: List[str]):
    """The engine config with `overrides` applied: the third side of an A/B run (``--variant``)."""
    from flashdino.engine.config import apply_overrides, validate

    if not overrides:
        raise ValueError("bench: --variant needs at least one key=value override")
    cfg = apply_overrides(copy.deepcopy(engine_cfg), list(overrides))
    validate(cfg)
    if harness.config_hash(cfg) == harness.config_hash(engine_cfg):
        raise ValueError(f"bench: the variant overrides {list(overrides)} leave the engine config unchanged")
    return cfg


def run_bench(engine_cfg, *, data: str = "synthetic", steps: int = 20, warmup: int = 3, phase_steps: int = 5,
              pool: int = 4, sides=SIDES, ceilings: bool = True, command: Optional[str] = None,
              config_file: Optional[str] = None, variant: Optional[List[str]] = None) -> Dict[str, Any]:
    """Measure the engine and/or the reference for `engine_cfg`; return the report dict.

    With `variant` (key=value overrides of the engine config), a third side "variant" is measured
    in the same run from the same initial weights and batches, and ``variant_vs_engine`` is the
    ratio of its images/s to the engine's (e.g. ``runtime.multicrop=packed``: does packing pay?)."""
    sides = list(sides)
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise ValueError(f"bench: sides must be a non-empty subset of {list(SIDES)}, got {sides}")
    if steps < 1 or warmup < 1 or phase_steps < 0 or pool < 1:
        raise ValueError(f"bench: need steps >= 1, warmup >= 1, phase_steps >= 0, pool >= 1 "
                         f"(got steps={steps}, warmup={warmup}, phase_steps={phase_steps}, pool={pool})")
    cfg_e = harness.harness_config(engine_cfg, data)
    cfg_r, missing_keys = harness.reference_config(cfg_e)
    # Built from cfg_e (the same scratch folders), and before anything is measured: a bad variant
    # costs nothing.
    cfg_v = variant_config(cfg_e, variant) if variant else None
    seed = cfg_e.train.seed

    # The reference first: its initial weights are the ones both sides start from. After it is
    # measured, one more step of it (its own batch) is what the FLOP counter sees.
    ref = harness.build_trainer(cfg_r)
    device = ref.device
    init_state = harness.model_state(ref)
    results: Dict[str, Any] = {}
    if "reference" in sides:
        _reset_memory(device)
        results["reference"] = measure(ref, cfg_r, data=data, steps=steps, warmup=warmup, phase_steps=phase_steps,
                                       pool=pool, seed=seed)
    flops = count_step_flops(ref, next(_batches(ref, cfg_r, data, 1, seed + 1)))
    flops["analytic"] = analytic_step_flops(harness.unwrap_model(ref), cfg_r)
    del ref
    harness.free_memory()

    # The engine (and the variant) start from the reference's initial weights.
    for name, cfg in (("engine", cfg_e if "engine" in sides else None), ("variant", cfg_v)):
        if cfg is None:
            continue
        _reset_memory(device)
        trainer = harness.build_trainer(cfg)
        init_diff = harness.load_model_state(trainer, init_state)
        results[name] = measure(trainer, cfg, data=data, steps=steps, warmup=warmup, phase_steps=phase_steps,
                                pool=pool, seed=seed)
        results[name]["init_max_abs_diff"] = init_diff
        del trainer
        harness.free_memory()

    meta = env.run_metadata(device, command)
    ceil = measure_ceilings(device, cfg_e.train.precision) if ceilings else {}
    dtype = peak_dtype(cfg_e.train.precision, bool(torch.backends.cuda.matmul.allow_tf32))
    sheet = datasheet_peak(meta["device"]["name"], dtype) if device.type == "cuda" else None
    measured = matmul_ceiling_for(ceil, dtype) if ceil else None
    for side in results.values():
        achieved = flops["total"] * side["images_per_s"] / cfg_e.data.batch_size  # FLOP/s
        side["achieved_tflops"] = achieved / 1e12
        side["mfu_datasheet"] = achieved / (sheet["tflops"] * 1e12) if sheet else None
        side["mfu_measured"] = achieved / (measured["tflops"] * 1e12) if measured else None
        side["mfu"] = side["mfu_datasheet"] if sheet else side["mfu_measured"]
    report = {
        "kind": "flashdino.bench",
        "schema": 1,
        "meta": meta,
        "config": {
            "label": harness.config_label(engine_cfg, config_file),
            "preset": engine_cfg.preset,
            "config_file": config_file,
            "hash": harness.config_hash(engine_cfg),
            "engine": harness.to_dict(cfg_e),
            "reference_settings": {k: v for k, v in harness.REFERENCE_SETTINGS.items() if k not in missing_keys},
            "reference_settings_not_in_config": missing_keys,
            "engine_vs_reference": harness.config_differences(cfg_e, cfg_r),
        },
        "workload": {
            "method": cfg_e.objective.method, "arch": cfg_e.model.arch, "batch_size": cfg_e.data.batch_size,
            "crops": f"2x{cfg_e.crops.global_size} + {cfg_e.crops.n_local}x{cfg_e.crops.local_size}",
            "precision": cfg_e.train.precision, "data": data, "steps": steps, "warmup": warmup,
            "phase_steps": phase_steps, "pool": pool if data == "synthetic" else None,
        },
        "flops": {"per_step": flops["total"], "per_image": flops["total"] / cfg_e.data.batch_size,
                  "by_op": flops["by_op"], "analytic_backbones_heads": flops["analytic"],
                  "counted_on": "one reference step (torch.utils.flop_counter)"},
        "peak": {"dtype": dtype, "datasheet": sheet, "measured": measured,
                 "mfu_basis": "datasheet dense peak" if sheet else "matmul ceiling measured in this run"},
        "ceilings": ceil,
        "sides": results,
        "speedup": (results["engine"]["images_per_s"] / results["reference"]["images_per_s"]
                    if "engine" in results and "reference" in results else None),
    }
    if cfg_v is not None:
        report["variant"] = {
            "overrides": list(variant),
            "config": harness.to_dict(cfg_v),
            "variant_vs_engine": harness.config_differences(cfg_v, cfg_e),
            "speedup_vs_engine": (results["variant"]["images_per_s"] / results["engine"]["images_per_s"]
                                  if "engine" in results else None),
        }
    return report


# ------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------


def _fmt(v, spec=".4g", none="n/a"):
    return none if v is None else format(v, spec)


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def to_markdown(report: Dict[str, Any]) -> str:
    meta, w, fl, pk = report["meta"], report["workload"], report["flops"], report["peak"]
    lines = [f"# flashdino bench: {report['config']['label']}", ""] + env.describe(meta) + [
        f"- workload: {w['method']} {w['arch']}, batch {w['batch_size']} images/step, crops {w['crops']}, "
        f"{w['precision']}, data {w['data']}; {w['steps']} timed steps after {w['warmup']} warm-up steps",
        f"- FLOPs per step: {fl['per_step'] / 1e9:.4g} GFLOP counted on {fl['counted_on']} "
        f"(backbones + heads by hand: {fl['analytic_backbones_heads']['total'] / 1e9:.4g} GFLOP)",
        f"- MFU basis: {pk['mfu_basis']} ({pk['dtype']}"
        + (f", {pk['datasheet']['tflops']} TFLOP/s, {pk['datasheet']['source']}" if pk["datasheet"] else "")
        + (f"; measured {pk['measured']['dtype']} matmul {pk['measured']['tflops']:.4g} TFLOP/s" if pk["measured"] else "")
        + ")",
    ]
    ceil = report.get("ceilings") or {}
    if ceil:
        lines.append(f"- ceilings (same run): copy {ceil['copy']['gbps']:.4g} GB/s; "
                     + "; ".join(f"{k.replace('matmul_', '')} matmul {v['tflops']:.4g} TFLOP/s ({'x'.join(map(str, v['shape']))})"
                                 for k, v in ceil.items() if k.startswith("matmul_"))
                     + f". {ceil.get('note', '')}")
    diffs = report["config"]["engine_vs_reference"]
    lines.append("- engine vs reference: " + (", ".join(f"{k} {a} (reference {b})" for k, (a, b) in diffs.items())
                                              or "identical configs (the engine runs the reference paths)"))
    # Both MFU bases: the datasheet peak (the usual definition) and the matmul ceiling measured in
    # this run (what the issues' MFU figures use: e.g. 20% of a measured 797 TFLOP/s).
    lines += ["", "| side | images/s | step ms median (p10-p90) | MFU (datasheet peak) | MFU (measured peak) | TFLOP/s "
                  "| peak mem MiB | warm-up s (first step) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["sides"].items():
        st = s["step_ms"]
        lines.append(
            f"| {name} | {s['images_per_s']:.4g} | {st['median']:.4g} ({st['p10']:.4g}-{st['p90']:.4g}) | "
            f"{_pct(s['mfu_datasheet'])} | {_pct(s['mfu_measured'])} | "
            f"{s['achieved_tflops']:.4g} | {_fmt(s['peak_mem_mib']['allocated'], '.0f')} | "
            f"{s['warmup_s']:.3g} ({_fmt(s['first_step_s'], '.3g')}) |")
    pool = w.get("pool")
    lines += ["", "Peak memory: the allocator's peak over the side's warm-up (compilation included) and timed steps"
              + (f", with the {pool} synthetic input batches it cycles through held on the device" if pool else "")
              + " (an upper bound for a training loop holding one batch)."]
    if report.get("speedup"):
        lines += ["", f"Speedup (engine / reference images/s): **{report['speedup']:.3f}x**"]
    if report.get("variant"):
        v = report["variant"]
        lines.append(f"- variant = engine with {' '.join(v['overrides'])}"
                     + (f": variant / engine images/s **{v['speedup_vs_engine']:.3f}x**" if v["speedup_vs_engine"] else ""))
    for name, s in report["sides"].items():
        c = s.get("compile")
        if c:
            lines.append(f"- {name} torch.compile: {c['graphs']} graph(s), {c['graph_breaks']} graph break(s), "
                         f"{c['compile_seconds']:.1f} s compiling (in the warm-up)")
        if s.get("recompiles_in_timed_steps"):
            lines.append(f"- **{name}: {s['recompiles_in_timed_steps']} graph(s) compiled during the timed steps**: "
                         "its step times include compilation (raise --warmup)")
        if s.get("attention"):
            lines.append(f"- {name} attention: {s['attention']}")
    phase_names: List[str] = []
    for s in report["sides"].values():
        phase_names += [p for p in s["phases"] if p not in phase_names]
    if phase_names:
        sides = list(report["sides"])
        lines += ["", "Per-phase time (ms per step, share of the step):", "",
                  "| phase | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
        for p in phase_names + ["other"]:
            cells = []
            for side in sides:
                s = report["sides"][side]
                if p == "other":
                    cells.append(_fmt(s["phase_other_ms"], ".3g"))
                else:
                    info = s["phases"].get(p)
                    cells.append(f"{info['ms_per_step']:.3g} ({100 * info['share']:.0f}%)" if info else "-")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += ["", "\"other\": step time outside the marked phases (Python overhead, phases inside compiled regions)."]
    if meta["device"]["type"] != "cuda":
        lines += ["", "CPU run: a functional check of the harness, not a performance measurement."]
    if "regression" in report:
        from .regression import to_markdown as regression_md

        lines += ["", regression_md(report["regression"])]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_out_dir(report: Dict[str, Any]) -> str:
    return os.path.join(DEFAULT_RESULTS, "bench", _slug(report["meta"]["device"]["name"]), report["config"]["label"])


def write_outputs(report: Dict[str, Any], out_dir: str, chart: bool = True) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json"), "markdown": os.path.join(out_dir, "bench.md")}
    with open(paths["json"], "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    with open(paths["markdown"], "w") as fh:
        fh.write(to_markdown(report))
    if chart:
        from .chart import bench_chart

        paths["chart"] = bench_chart(report, os.path.join(out_dir, "bench.png"))
    return paths


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a named preset; default: demo when no --config is given")
    parser.add_argument("--config", help="a YAML or JSON config file")
    parser.add_argument("--data-path", help="dataset path for --data pipeline (data.path)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. runtime.compile=block")


def config_from_args(args):
    overrides = list(args.overrides)
    if getattr(args, "data_path", None):
        overrides.append(f"data.path={args.data_path}")
    return harness.config_from_cli(args.preset, args.config, overrides)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", choices=("synthetic", "pipeline"), default="synthetic",
                        help="synthetic on-device crops (default) or the config's real data pipeline")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per side (compile happens here)")
    parser.add_argument("--phase-steps", type=int, default=5, help="extra steps with per-phase timing (0: none)")
    parser.add_argument("--pool", type=int, default=4, help="distinct synthetic batches cycled through")
    parser.add_argument("--sides", default="engine,reference", help="engine, reference or both (comma-separated)")
    parser.add_argument("--variant", nargs="+", metavar="KEY=VALUE",
                        help="also measure the engine with these overrides as a third side, in the same run "
                             "(e.g. --variant runtime.multicrop=packed)")
    parser.add_argument("--out", help="output folder (default: profiling/results/bench/<device>/<config label>)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument("--no-ceilings", action="store_true", help="skip the copy/matmul ceiling measurement")
    parser.add_argument("--baseline", help="bench JSON to compare with (regression guard); exit 1 on a regression")
    parser.add_argument("--compare", metavar="NEW_JSON", help="only compare NEW_JSON with --baseline; run nothing")
    parser.add_argument("--threshold", type=float, default=0.05, help="regression threshold (relative drop)")
    parser.add_argument("--allow-mismatch", action="store_true", help="compare with a baseline of another device/config")
    parser.add_argument("--save-baseline", metavar="PATH", help="also store this result as a baseline JSON at PATH")
    parser.add_argument("--kernels", metavar="LIST", help="run the kernel microbenchmarks instead (comma-separated "
                        "subset of ema,adamw_ema,coding_rate,simdino,centering,sinkhorn, or 'all'); see "
                        "flashdino.profiling.kernel_bench")


def main(args) -> int:
    from .regression import IncomparableResults, check_files, compare, load

    if args.compare:
        if not args.baseline:
            print("flashdino bench: --compare needs --baseline", file=sys.stderr)
            return 2
        return check_files(args.compare, args.baseline, args.threshold, args.allow_mismatch)
    if args.kernels:
        return _kernel_bench(args)
    baseline = None
    if args.baseline:  # read it first: a missing baseline should not cost a whole run
        try:
            baseline = load(args.baseline)
        except (ValueError, FileNotFoundError) as exc:
            print(f"flashdino bench: {exc}", file=sys.stderr)
            return 2
    if args.steps < 1 or args.warmup < 1 or args.phase_steps < 0 or args.pool < 1 or not 0 < args.threshold < 1:
        print(f"flashdino bench: need --steps >= 1, --warmup >= 1, --phase-steps >= 0, --pool >= 1 and 0 < --threshold "
              f"< 1 (got {args.steps}, {args.warmup}, {args.phase_steps}, {args.pool}, {args.threshold})", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    if args.variant:
        try:  # a bad variant must not cost the reference and engine runs first
            variant_config(cfg, args.variant)
        except ValueError as exc:
            print(f"flashdino bench: {exc}", file=sys.stderr)
            return 2
    command = env.cli_command("bench", args)
    report = run_bench(cfg, data=args.data, steps=args.steps, warmup=args.warmup, phase_steps=args.phase_steps,
                       pool=args.pool, sides=[s.strip() for s in args.sides.split(",") if s.strip()],
                       ceilings=not args.no_ceilings, command=command, config_file=args.config,
                       variant=args.variant)
    status = 0
    if baseline is not None:
        try:
            report["regression"] = compare(report, baseline, args.threshold, args.allow_mismatch)
            status = 0 if report["regression"]["ok"] else 1
        except IncomparableResults as exc:
            print(f"flashdino bench: {exc}", file=sys.stderr)
            status = 2
    out_dir = args.out or default_out_dir(report)
    paths = write_outputs(report, out_dir, chart=not args.no_chart)
    if args.save_baseline:
        os.makedirs(os.path.dirname(os.path.abspath(args.save_baseline)), exist_ok=True)
        with open(args.save_baseline, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
        paths["baseline"] = args.save_baseline
    print(to_markdown(report))
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    bad = [s for s, r in report["sides"].items() if not r["losses_finite"]]
    if bad:
        print(f"flashdino bench: non-finite loss on the {', '.join(bad)} side(s)", file=sys.stderr)
        status = status or 1
    return status


def _kernel_bench(args) -> int:
    """Each fused kernel against its eager reference over its sizes, as a fraction of same-run ceilings."""
    from . import kernel_bench

    kernels = None if args.kernels == "all" else [k.strip() for k in args.kernels.split(",") if k.strip()]
    out_dir = args.out or os.path.join(DEFAULT_RESULTS, "kernel_bench")
    try:
        report = kernel_bench.run_benchmarks(kernels, out_dir=out_dir, command=env.cli_command("bench", args))
    except ValueError as exc:
        print(f"flashdino bench: {exc}", file=sys.stderr)
        return 2
    print(kernel_bench.to_markdown(report))
    print(f"wrote {out_dir}", file=sys.stderr)
    return 0

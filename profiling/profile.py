"""torch.profiler trace, top kernels and NVTX ranges of a few training steps.

Examples:
  flashdino profile --preset simdino_vitb16 train.precision=bf16 runtime.compile=block
  flashdino profile --preset demo --steps 2 --warmup 1                    # tiny, runs on a CPU
  flashdino profile --reference ...                                       # profile the reference instead
  nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o flashdino \\
      flashdino profile --nsys --preset simdino_vitb16                   # Nsight Systems, no torch.profiler

Writes to --out: ``profile.pt.trace.json`` (Chrome trace format: open it in Perfetto or
chrome://tracing; TensorBoard's profiler plugin reads the folder), ``profile.md`` / ``profile.json``
(top kernels by time with their share of the step, time per phase). Every phase of the step
(data_wait, h2d, teacher_forward, student_forward, loss, backward, optimizer, ema) is an NVTX
range (package ``nvtx``, domain "flashdino") and a torch.profiler range. On a CPU the "kernels"
are the CPU operators.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List

import torch

from . import env, harness
from .bench import DEFAULT_RESULTS, _slug, _step, add_config_arguments, config_from_args
from .ranges import PHASES, PhaseTimer
from .timing import StepClock, summarize


def top_kernels(prof, step_time_us: float, top: int, cuda: bool) -> List[Dict[str, Any]]:
    """Operators/kernels sorted by self time on the device (CUDA) or the CPU, with share of the step time."""
    rows = []
    for evt in prof.key_averages():
        if evt.is_user_annotation or evt.key in PHASES or evt.key.startswith("ProfilerStep"):
            continue
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = evt.self_device_time_total
        else:
            t = evt.self_cpu_time_total
        if t <= 0:
            continue
        rows.append({"name": evt.key, "calls": evt.count, "total_us": t, "avg_us": t / max(evt.count, 1),
                     "share_of_step": t / step_time_us if step_time_us > 0 else None})
    rows.sort(key=lambda r: -r["total_us"])
    return rows[:top]


def run_profile(cfg, *, reference: bool = False, steps: int = 3, warmup: int = 2, data: str = "synthetic",
                pool: int = 4, out_dir: str, top: int = 25, record_shapes: bool = False,
                profile_memory: bool = False, with_stack: bool = False, nsys: bool = False,
                emit_nvtx: bool = False, command: str = None, config_file: str = None) -> Dict[str, Any]:
    if steps < 1 or warmup < 0:
        raise ValueError(f"profile: need steps >= 1 and warmup >= 0 (got steps={steps}, warmup={warmup})")
    if emit_nvtx and not nsys:
        raise ValueError("profile: --emit-nvtx (one NVTX range per operator) goes with --nsys; torch.profiler "
                         "cannot run at the same time")
    cfg_run = harness.harness_config(cfg, data)
    if reference:
        cfg_run, _ = harness.reference_config(cfg_run)
    trainer = harness.build_trainer(cfg_run)
    device = trainer.device
    cuda = device.type == "cuda"
    seed = cfg_run.train.seed
    batches = (harness.synthetic_batches(cfg_run, device, pool=pool, seed=seed) if data == "synthetic"
               else harness.loader_batches(trainer))
    for _ in range(warmup):
        _step(trainer, batches, seed)
    harness.synchronize(device)
    os.makedirs(out_dir, exist_ok=True)

    clock = StepClock(device)
    phase_timer = PhaseTimer(device)
    trace_path = None
    prof = None
    if nsys:
        # Nsight Systems captures between cudaProfilerStart/Stop (--capture-range=cudaProfilerApi).
        nvtx_ops = torch.autograd.profiler.emit_nvtx() if emit_nvtx else None
        if cuda:
            torch.cuda.profiler.start()
        with phase_timer, (nvtx_ops if nvtx_ops is not None else _null()):
            clock.mark()
            for _ in range(steps):
                _step(trainer, batches, seed)
                clock.mark()
        harness.synchronize(device)
        if cuda:
            torch.cuda.profiler.stop()
    else:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities, record_shapes=record_shapes, profile_memory=profile_memory,
                                    with_stack=with_stack) as prof, phase_timer:
            clock.mark()
            for _ in range(steps):
                _step(trainer, batches, seed)
                clock.mark()
                prof.step()
            harness.synchronize(device)
        trace_path = os.path.join(out_dir, "profile.pt.trace.json")
        prof.export_chrome_trace(trace_path)

    times = clock.durations_ms()
    step_total_us = sum(times) * 1e3
    phases = {n: {"ms_per_step": s["total_ms"] / steps, "share": s["total_ms"] * 1e3 / step_total_us}
              for n, s in phase_timer.summary().items()}
    report = {
        "kind": "flashdino.profile",
        "schema": 1,
        "meta": env.run_metadata(device, command),
        "config": {"label": harness.config_label(cfg, config_file), "side": "reference" if reference else "engine",
                   "hash": harness.config_hash(cfg)},
        "workload": {"method": cfg_run.objective.method, "arch": cfg_run.model.arch,
                     "batch_size": cfg_run.data.batch_size, "precision": cfg_run.train.precision, "data": data,
                     "steps": steps, "warmup": warmup},
        "step_ms": summarize(times),
        "phases": phases,
        "top_kernels": top_kernels(prof, step_total_us, top, cuda) if prof is not None else [],
        "kernel_time": "device (CUDA kernels)" if cuda else "CPU operators (self time)",
        "trace": trace_path,
        "mode": "nsys (NVTX only)" if nsys else "torch.profiler",
    }
    with open(os.path.join(out_dir, "profile.json"), "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    with open(os.path.join(out_dir, "profile.md"), "w") as fh:
        fh.write(to_markdown(report))
    del trainer
    harness.free_memory()
    return report


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def to_markdown(report: Dict[str, Any]) -> str:
    w, st = report["workload"], report["step_ms"]
    lines = [f"# flashdino profile: {report['config']['label']} ({report['config']['side']})", ""] + env.describe(report["meta"]) + [
        f"- workload: {w['method']} {w['arch']}, batch {w['batch_size']}, {w['precision']}, data {w['data']}; "
        f"{w['steps']} profiled steps after {w['warmup']} warm-up steps ({report['mode']})",
        f"- step time: median {st['median']:.4g} ms (p10 {st['p10']:.4g}, p90 {st['p90']:.4g}); profiler overhead included",
    ]
    if report["trace"]:
        lines.append(f"- trace: `{report['trace']}` (Perfetto / chrome://tracing / TensorBoard profiler plugin)")
    lines += ["- Nsight Systems: `nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o flashdino "
              "flashdino profile --nsys ...` (phases are NVTX ranges in domain \"flashdino\")"]
    if report["phases"]:
        lines += ["", "| phase | ms per step | share of step |", "|---|---:|---:|"]
        for name, p in report["phases"].items():
            lines.append(f"| {name} | {p['ms_per_step']:.4g} | {100 * p['share']:.1f}% |")
    if report["top_kernels"]:
        lines += ["", f"Top {len(report['top_kernels'])} by self time ({report['kernel_time']}):", "",
                  "| # | kernel / operator | calls | total ms | avg us | share of step |", "|---:|---|---:|---:|---:|---:|"]
        for i, k in enumerate(report["top_kernels"], 1):
            name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
            share = "n/a" if k["share_of_step"] is None else f"{100 * k['share_of_step']:.1f}%"
            lines.append(f"| {i} | `{name}` | {k['calls']} | {k['total_us'] / 1e3:.4g} | {k['avg_us']:.4g} | {share} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--reference", action="store_true", help="profile the reference eager implementation")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (compile happens here)")
    parser.add_argument("--data", choices=("synthetic", "pipeline"), default="synthetic")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--top", type=int, default=25, help="rows of the top-kernels table")
    parser.add_argument("--record-shapes", action="store_true")
    parser.add_argument("--profile-memory", action="store_true")
    parser.add_argument("--with-stack", action="store_true")
    parser.add_argument("--nsys", action="store_true", help="NVTX ranges only, between cudaProfilerStart/Stop; "
                        "run under nsys with --capture-range=cudaProfilerApi")
    parser.add_argument("--emit-nvtx", action="store_true", help="with --nsys: one NVTX range per operator too")
    parser.add_argument("--out", help="output folder (default: profiling/results/profile/<device>/<config label>)")


def main(args) -> int:
    if args.steps < 1 or args.warmup < 0 or (args.emit_nvtx and not args.nsys):
        print("flashdino profile: need --steps >= 1 and --warmup >= 0; --emit-nvtx needs --nsys (torch.profiler "
              "and per-operator NVTX ranges cannot run together)", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    command = env.cli_command("profile", args)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out_dir = args.out or os.path.join(DEFAULT_RESULTS, "profile", _slug(device_name),
                                       harness.config_label(cfg, args.config) + ("-reference" if args.reference else ""))
    report = run_profile(cfg, reference=args.reference, steps=args.steps, warmup=args.warmup, data=args.data,
                         pool=args.pool, out_dir=out_dir, top=args.top, record_shapes=args.record_shapes,
                         profile_memory=args.profile_memory, with_stack=args.with_stack, nsys=args.nsys,
                         emit_nvtx=args.emit_nvtx, command=command, config_file=args.config)
    print(to_markdown(report))
    print(f"wrote {out_dir}", file=sys.stderr)
    return 0

"""Microbenchmarks of the Triton kernels against their eager references (issue #5).

Every kernel is timed beside its eager reference over the sizes that matter, and reported as
time, achieved GB/s (memory-bound kernels) or TFLOP/s, and the fraction of two ceilings
measured in the same run: a large device-to-device copy (bandwidth) and a large bf16 matmul.

    python -m flashdino.profiling.kernel_bench [--kernels ema,adamw_ema,coding_rate,simdino,centering,sinkhorn]
                                               [--tiny] [--repeats 20] [--out profiling/results/kernel_bench]

Writes ``kernel_bench.json`` and ``kernel_bench.md`` (date, device, versions, exact command). On
a GPU each timed call starts with a cold L2 cache (see Timer).
Without a GPU it runs the same code on tiny sizes through Triton's interpreter (a smoke test,
not a measurement). Sizes: EMA / AdamW+EMA over ViT-S, ViT-B, ViT-L (backbone + SimDINO head)
parameter lists; coding rate and SimDINO loss for B = 16..512, p = 256, 2 views; DINO centering
at B = 64, V = 12, K = 65536 (forward + backward, with peak memory); Sinkhorn at 2B = 128 rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch

from .env import describe, run_metadata
from .timing import median_time_ms

if not torch.cuda.is_available():  # must precede the first Triton import (kernels are decorated then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNELS = ("ema", "adamw_ema", "coding_rate", "simdino", "centering", "sinkhorn")

# (embed dim, depth) of the backbones; the SimDINO head (D -> 2048 -> 2048 -> 256) is added.
ARCHS = {"vit_small": (384, 12), "vit_base": (768, 12), "vit_large": (1024, 24)}


# ------------------------------------------------------------------------------------ timing

class Timer:
    """Median time of ``fn`` in milliseconds, with this run's warm-up and repeat counts.

    On a GPU every timed call starts with a cold L2 cache: a kernel's inputs left there by the
    previous repeat (the Sinkhorn case's 32 MiB fits the H100's 50 MB L2) would otherwise be read
    at cache speed, and its bandwidth compared with a DRAM-bound copy would be inflated."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self._flush_buffer = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2 ** 20
            self._flush_buffer = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)

    def _flush_l2(self) -> None:
        self._flush_buffer.zero_()

    def __call__(self, fn) -> float:
        before = self._flush_l2 if self._flush_buffer is not None else None
        return median_time_ms(fn, self.device, self.repeats, self.warmup, before=before)


def peak_memory_mb(device, fn) -> float | None:
    """Peak memory allocated by ``fn`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


# ------------------------------------------------------------------------------------ ceilings

def measure_ceilings(device, timer, tiny: bool) -> dict:
    n_bytes = (1 << 20) if tiny else (1 << 30)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    n = 128 if tiny else 8192
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    mm_ms = timer(lambda: a @ b)
    return {
        "copy_bytes": 2 * n_bytes,
        "copy_gbps": 2 * n_bytes / copy_ms / 1e6,
        "matmul_shape": [n, n, n],
        "matmul_bf16_tflops": 2 * n ** 3 / mm_ms / 1e9,
    }


# ------------------------------------------------------------------------------------ cases

def vit_param_shapes(dim: int, depth: int, patch: int = 16, tokens: int = 197) -> list:
    """Parameter shapes of a DINO-style ViT + SimDINO head (what the EMA and optimizer walk over)."""
    shapes = [(dim, 3, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,),
                   (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    shapes += [(dim,), (dim,), (2048, dim), (2048,), (2048, 2048), (2048,), (256, 2048), (256,)]
    return shapes


def _tiny_shapes():
    return [(64, 32), (32,), (17,), (96, 64)]


def _row(kernel, case, impl, ms, bytes_moved=None, flops=None, ceilings=None, **extra):
    row = {"kernel": kernel, "case": case, "impl": impl, "time_ms": ms}
    if bytes_moved is not None:
        row["gbps"] = bytes_moved / ms / 1e6
        row["frac_copy_bw"] = row["gbps"] / ceilings["copy_gbps"]
    if flops is not None:
        row["tflops"] = flops / ms / 1e9
        row["frac_matmul"] = row["tflops"] / ceilings["matmul_bf16_tflops"]
    row.update(extra)
    return row


def _speedups(rows):
    eager = {(r["kernel"], r["case"]): r["time_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        ref = eager.get((r["kernel"], r["case"]))
        if ref is not None:
            r["speedup_vs_eager"] = ref / r["time_ms"]
    return rows


def bench_ema(device, timer, ceilings, tiny):
    from flashdino.kernels import get_ema_updater

    rows = []
    archs = {"tiny": _tiny_shapes()} if tiny else {k: vit_param_shapes(*v) for k, v in ARCHS.items()}
    for name, shapes in archs.items():
        student = [torch.randn(s, device=device) for s in shapes]
        teacher = [t.clone() for t in student]
        numel = sum(t.numel() for t in student)
        case = f"{name} ({numel / 1e6:.1f}M params, {len(shapes)} tensors, fp32)"
        for impl in ("eager", "triton"):
            updater = get_ema_updater(impl)(teacher, student)
            ms = timer(lambda: updater.update(0.996))
            # Reads teacher + student, writes teacher.
            rows.append(_row("ema", case, impl, ms, bytes_moved=3 * 4 * numel, ceilings=ceilings))
        del student, teacher
    return rows


def bench_adamw_ema(device, timer, ceilings, tiny):
    from flashdino.kernels import FusedAdamWEMA

    rows = []
    archs = {"tiny": _tiny_shapes()} if tiny else {k: vit_param_shapes(*v) for k, v in ARCHS.items()}
    for name, shapes in archs.items():
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
        teacher = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p)
        numel = sum(p.numel() for p in params)
        case = f"{name} ({numel / 1e6:.1f}M params, fp32)"
        fused_torch = device.type == "cuda"
        ref_opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, fused=fused_torch or None,
                                    foreach=None if fused_torch else True)

        def eager_step():
            ref_opt.step()
            torch._foreach_lerp_(teacher, [p.detach() for p in params], 1 - 0.996)

        # Minimal traffic of the fused pass: read p, g, m, v, t; write p, m, v, t.
        bytes_moved = 9 * 4 * numel
        impl_name = "eager (torch fused AdamW + _foreach_lerp_)" if fused_torch else "eager"
        rows.append(_row("adamw_ema", case, "eager", timer(eager_step), bytes_moved, ceilings=ceilings,
                         baseline=impl_name))
        opt = FusedAdamWEMA(params, teacher, lr=1e-4, weight_decay=0.04, kind="triton")
        rows.append(_row("adamw_ema", case, "triton", timer(lambda: opt.step(0.996)), bytes_moved,
                         ceilings=ceilings))
        del params, teacher, ref_opt, opt
    return rows


def _unit(shape, device, dtype=torch.float32):
    x = torch.randn(shape, device=device)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


def bench_coding_rate(device, timer, ceilings, tiny):
    from flashdino.kernels import get_coding_rate
    from flashdino.kernels.coding_rate import coding_rate_fused

    rows = []
    dim = 32 if tiny else 256
    for batch in ((8, 16) if tiny else (16, 32, 64, 128, 256, 512)):
        z = _unit((2, batch, dim), device).requires_grad_()
        n = min(batch, dim)
        # Gram/covariance + its inverse applied to Z (backward) + the n³/3 factorization, per view.
        flops = 2 * (2 * 2 * batch * dim * n + n ** 3 / 3)
        case = f"B={batch}, p={dim}, 2 views, fwd+bwd"
        # "linalg": the kernels package's cuSOLVER path (hand-written backward), timed beside the
        # register kernel so the crossover (TRITON_MAX_N) is measured in the same run.
        fns = {"eager": get_coding_rate("eager"), "triton": get_coding_rate("triton"),
               "linalg": lambda z, eps, n: coding_rate_fused(z, eps, n, max_triton_n=0)}
        for impl, fn in fns.items():
            def step():
                torch.autograd.grad(fn(z, 0.05, 8).sum(), z)

            rows.append(_row("coding_rate", case, impl, timer(step), flops=flops, ceilings=ceilings))
    return rows


def bench_simdino(device, timer, ceilings, tiny):
    from flashdino.kernels import get_simdino_loss

    rows = []
    dim, n_crops = (32, 4) if tiny else (256, 12)
    for batch in ((8, 16) if tiny else (16, 32, 64, 128, 256, 512)):
        s = _unit((n_crops * batch, dim), device).requires_grad_()
        t = _unit((2 * batch, dim), device)
        case = f"B={batch}, p={dim}, V={n_crops}, fwd+bwd"
        for impl in ("eager", "triton"):
            fn = get_simdino_loss(impl)

            def step():
                torch.autograd.grad(fn(s, t, n_crops, eps=0.05, world_size=8)[0], s)

            rows.append(_row("simdino", case, impl, timer(step), ceilings=ceilings))
    return rows


def bench_centering(device, timer, ceilings, tiny):
    from flashdino.kernels import get_dino_centering

    batch, n_crops, n_protos = (2, 4, 512) if tiny else (64, 12, 65536)
    rows = []
    for dtype in (torch.float32, torch.bfloat16 if device.type == "cuda" else torch.float16):
        a = torch.randn(n_crops * batch, n_protos, device=device).to(dtype).requires_grad_()
        u = torch.randn(2 * batch, n_protos, device=device).to(dtype)
        c = torch.zeros(n_protos, device=device)
        es = a.element_size()
        # Forward reads student + teacher; backward reads both again and writes the gradient.
        bytes_moved = es * n_protos * (2 * (n_crops + 2) * batch + n_crops * batch)
        case = f"B={batch}, V={n_crops}, K={n_protos}, {str(dtype).replace('torch.', '')}, fwd+bwd"
        for impl in ("eager", "triton"):
            fn = get_dino_centering(impl)

            def step():
                loss, _ = fn(a, u, c, n_crops)
                torch.autograd.grad(loss, a)

            ms = timer(step)
            rows.append(_row("centering", case, impl, ms, bytes_moved, ceilings=ceilings,
                             peak_mem_mb=peak_memory_mb(device, step)))
        del a, u
    return rows


def bench_sinkhorn(device, timer, ceilings, tiny):
    from flashdino.kernels import get_sinkhorn

    rows_n, n_protos = (8, 512) if tiny else (128, 65536)
    u = torch.randn(rows_n, n_protos, device=device)
    case = f"rows={rows_n}, K={n_protos}, 3 iterations, fp32"
    rows = []
    for impl in ("eager", "triton"):
        fn = get_sinkhorn(impl)
        ms = timer(lambda: fn(u, 0.05, 3))
        # Minimal traffic: read the logits once, write the probabilities once.
        rows.append(_row("sinkhorn", case, impl, ms, 2 * 4 * rows_n * n_protos, ceilings=ceilings,
                         peak_mem_mb=peak_memory_mb(device, lambda: fn(u, 0.05, 3))))
    return rows


BENCHES = {"ema": bench_ema, "adamw_ema": bench_adamw_ema, "coding_rate": bench_coding_rate,
           "simdino": bench_simdino, "centering": bench_centering, "sinkhorn": bench_sinkhorn}


# ------------------------------------------------------------------------------------ report

def to_markdown(report: dict) -> str:
    meta, ceil = report["meta"], report["ceilings"]
    lines = [
        "# Kernel microbenchmarks", "",
        *describe(meta),
        f"- mode: {meta['mode']}" + ("" if meta.get("complete", True) else
                                      f"; **incomplete**: only {', '.join(meta['kernels_done'])} finished"),
        f"- ceilings (same run): copy {ceil['copy_gbps']:.1f} GB/s; bf16 matmul "
        f"{ceil['matmul_bf16_tflops']:.2f} TFLOP/s ({'x'.join(map(str, ceil['matmul_shape']))})", "",
        "| kernel | case | impl | time (ms) | GB/s | % copy BW | TFLOP/s | % matmul | speedup vs eager | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    for r in report["results"]:
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['impl']} | {r['time_ms']:.4f} | {f(r.get('gbps'), '.1f')} | "
            f"{f(100 * r['frac_copy_bw'] if 'frac_copy_bw' in r else None, '.1f')} | {f(r.get('tflops'), '.3f')} | "
            f"{f(100 * r['frac_matmul'] if 'frac_matmul' in r else None, '.2f')} | "
            f"{f(r.get('speedup_vs_eager'), '.2f')} | {f(r.get('peak_mem_mb'), '.1f')} |")
    if meta["mode"] != "gpu":
        lines += ["", "CPU run through the Triton interpreter on tiny sizes: a smoke test of the harness, "
                      "not a performance measurement."]
    return "\n".join(lines) + "\n"


def run_benchmarks(kernels=None, tiny: bool | None = None, out_dir: str | None = None, repeats: int = 20,
                   warmup: int = 3, command: str | None = None) -> dict:
    """Run the selected benchmarks; write JSON + Markdown to ``out_dir`` when given; return the report."""
    kernels = list(kernels or KERNELS)
    unknown = [k for k in kernels if k not in BENCHES]
    if unknown:
        raise ValueError(f"kernel_bench: unknown kernel(s) {unknown}; choose from {list(KERNELS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tiny is None:
        tiny = device.type != "cuda"
    if device.type != "cuda" and not tiny:
        raise ValueError("kernel_bench: full sizes need a CUDA GPU; use --tiny on CPU")
    timer = Timer(device, warmup, repeats)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 paths are measured as the parity tests run them
    ceilings = measure_ceilings(device, timer, tiny)
    meta = _meta(device, tiny, repeats, warmup, command)
    results = []
    report = None
    for i, k in enumerate(kernels):
        results += _speedups(BENCHES[k](device, timer, ceilings, tiny))
        # Written after every kernel family: a run stopped from outside (a session's deadline) keeps
        # the families it finished, marked incomplete.
        report = {"meta": {**meta, "kernels_done": kernels[: i + 1], "complete": i == len(kernels) - 1},
                  "ceilings": ceilings, "results": list(results)}
        if out_dir:
            _write(report, out_dir)
    return report


def _write(report: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, text in (("kernel_bench.json", json.dumps(report, indent=2)), ("kernel_bench.md", to_markdown(report))):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def _meta(device, tiny, repeats, warmup, command) -> dict:
    """What the run was: the same for every kernel family, so taken once."""
    command = command or " ".join(shlex.quote(a) for a in [sys.executable, "-m", __name__] + sys.argv[1:])
    # The bench's metadata (device and driver, versions, commit and the files changed since it,
    # environment), plus this run's mode.
    return {**run_metadata(device, command), "mode": "gpu" if device.type == "cuda" else "cpu-interpreter",
            "tiny": tiny, "repeats": repeats, "warmup": warmup}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (default on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=os.path.join("profiling", "results", "kernel_bench"))
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "flashdino.profiling.kernel_bench"] +
                       (argv if argv is not None else sys.argv[1:]))
    report = run_benchmarks(args.kernels.split(","), tiny=args.tiny or None, out_dir=args.out,
                            repeats=args.repeats, warmup=args.warmup, command=command)
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()

"""Ahead-of-time compile of every kernel for a GPU target, without a GPU.

Triton's interpreter (the CPU tests) does not run the compiler, so a kernel can pass every CPU
test and still fail to compile. This compiles each kernel, in the specializations the launchers
use, down to a cubin for ``sm_90`` (H100) with the ptxas bundled in the triton wheel, and reports
what it finds (e.g. whether the EMA / AdamW streams got 128-bit vectorized accesses).

    TRITON_INTERPRET=0 python -m flashdino.kernels.compile_check [--arch 90]

Must run with the interpreter off (kernels are decorated as compiled functions at import).
"""
from __future__ import annotations

import argparse
import json
import os
import re

P = "*fp32"
DIVISIBLE_INTS = ("n_protos", "stride_s", "stride_t", "stride_u", "dim")


def _specs(tl):
    from .centering import sinkhorn as sk
    from .centering import triton_dino as dn
    from .coding_rate import simdino as sd
    from .coding_rate import triton_cr as cr
    from .ema import triton_ema as em

    i32, f32 = "i32", "fp32"
    ema_sig = {"table_ptr": "*i64", "weight": f32}
    adam_sig = {"table_ptr": "*i64", **{k: f32 for k in ("decay", "lerp1", "beta2", "one_minus_beta2",
                                                           "neg_step_size", "bc2_sqrt", "eps", "ema_weight")}}
    cr_sig = {"z_ptr": P, "y_ptr": P, "s_g": i32, "s_r": i32, "s_c": i32, "y_g": i32, "n_rows": i32, "n_cols": i32,
              "alpha": f32, "grad_scale": f32, "rate_ptr": P, "grad_ptr": P}
    comp_sig = {"s_ptr": P, "t_ptr": P, "n_views": i32, "batch": i32, "dim": i32, "scale": f32, "part_ptr": P,
                "grad_ptr": P}
    fwd_sig = {"s_ptr": "*bf16", "t_ptr": "*bf16", "c_ptr": P, "spart_ptr": P, "tpart_ptr": P, "csum_ptr": P,
               "n_views": i32, "batch": i32, "n_protos": i32, "stride_s": i32, "stride_t": i32, "inv_tau_s": f32,
               "inv_tau_t": f32, "b_per_prog": i32}
    comb_sig = {"spart_ptr": P, "tpart_ptr": P, "loss_ptr": P, "lse_s_ptr": P, "lse_t_ptr": P, "qsum_ptr": P,
                "n_kb": i32, "n_views": i32, "batch": i32}
    bwd_sig = {"s_ptr": "*bf16", "t_ptr": "*bf16", "c_ptr": P, "lse_s_ptr": P, "lse_t_ptr": P, "qsum_ptr": P,
               "go_ptr": P, "grad_ptr": "*bf16", "n_views": i32, "batch": i32, "n_protos": i32, "stride_s": i32,
               "stride_t": i32, "inv_tau_s": f32, "inv_tau_t": f32, "scale": f32}
    sk_u = {"u_ptr": "*bf16", "stride_u": i32}
    return [
        ("ema fp32", em._ema_kernel, ema_sig,
         dict(T_DTYPE=tl.float32, S_DTYPE=tl.float32, ALIGNED=True, BLOCK=em.BLOCK), 4),
        ("ema bf16<-fp32", em._ema_kernel, ema_sig,
         dict(T_DTYPE=tl.bfloat16, S_DTYPE=tl.float32, ALIGNED=True, BLOCK=em.BLOCK), 4),
        ("adamw_ema fp32", em._adamw_ema_kernel, adam_sig,
         dict(G_DTYPE=tl.float32, T_DTYPE=tl.float32, C_DTYPE=tl.float32, HAS_COPY=False, ALIGNED=True,
              BLOCK=em.BLOCK), 4),
        ("adamw_ema bf16 masters", em._adamw_ema_kernel, adam_sig,
         dict(G_DTYPE=tl.bfloat16, T_DTYPE=tl.bfloat16, C_DTYPE=tl.bfloat16, HAS_COPY=True, ALIGNED=True,
              BLOCK=em.BLOCK), 4),
        *[(f"coding_rate {'gram' if gram else 'cov'} {npad}", cr._coding_rate_kernel, cr_sig,
           dict(HAS_Y=gram, GRAM=gram, WITH_GRAD=True, NPAD=npad, BLOCK_K=cr.launch_config(npad)["BLOCK_K"]),
           cr.launch_config(npad)["num_warps"]) for npad, gram in ((16, True), (32, False), (64, True), (128, False))],
        ("compression", sd._compression_kernel, comp_sig, dict(WITH_GRAD=True, PPAD=256), 4),
        ("dino fwd centering", dn._dino_fwd_kernel, fwd_sig, dict(MODE=0, VPAD=16, BLOCK_K=dn.BLOCK_K), 4),
        ("dino fwd probs", dn._dino_fwd_kernel, fwd_sig, dict(MODE=1, VPAD=16, BLOCK_K=dn.BLOCK_K), 4),
        ("dino combine", dn._dino_combine_kernel, comb_sig, dict(MODE=0, VPAD=16, KBPAD=256), 8),
        ("dino bwd centering", dn._dino_bwd_kernel, bwd_sig, dict(MODE=0, VPAD=16, BLOCK_K=dn.BLOCK_K), 4),
        ("dino bwd probs", dn._dino_bwd_kernel, bwd_sig, dict(MODE=1, VPAD=16, BLOCK_K=dn.BLOCK_K), 4),
        ("sinkhorn stats", sk._proto_stats_kernel,
         {**sk_u, "n_rows": i32, "n_protos": i32, "inv_tau": f32, "max_ptr": P, "sum_ptr": P},
         dict(BLOCK_R=sk.BLOCK_R, BLOCK_K=sk.BLOCK_K), 4),
        ("sinkhorn proto pass", sk._proto_pass_kernel,
         {**sk_u, "n_rows": i32, "n_protos": i32, "inv_tau": f32, "m_ptr": P, "c_ptr": P, "b_ptr": P, "out_ptr": P},
         dict(BLOCK_R=sk.BLOCK_R, BLOCK_K=sk.BLOCK_K), 4),
        ("sinkhorn sample pass", sk._sample_pass_kernel,
         {**sk_u, "n_protos": i32, "inv_tau": f32, "m_ptr": P, "a_ptr": P, "btot_ptr": P, "c_ptr": P,
          "b_out_ptr": P}, dict(FIRST=True, BLOCK_K=4 * sk.BLOCK_K), 8),
        ("sinkhorn write", sk._write_probs_kernel,
         {**sk_u, "n_protos": i32, "inv_tau": f32, "m_ptr": P, "c_ptr": P, "a_ptr": P, "b_ptr": P, "btot_ptr": P,
          "p_ptr": P}, dict(BLOCK_K=sk.BLOCK_K), 4),
    ]


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread, from the bundled ptxas in verbose mode."""
    import subprocess
    import tempfile

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        suffix = "a" if arch >= 90 else ""
        res = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spill.group(1)) if spill else None}


def compile_all(arch: int = 90) -> list:
    """Compile every kernel specialization; returns one dict per kernel (name, ok, error, stats)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (kernels must be compiled functions)")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    out = []
    for name, fn, sig, consts, warps in _specs(tl):
        full_sig = dict(sig)
        missing = [a for a in fn.arg_names if a not in full_sig and a not in consts]
        if missing:
            raise ValueError(f"compile_check: no type for {name} argument(s) {missing}")
        full_sig.update({k: "constexpr" for k in consts})
        full_sig = {a: full_sig[a] for a in fn.arg_names}
        # As at a real launch: torch allocations are 16-byte aligned, and Triton specializes integer
        # arguments divisible by 16 (K = 65536, p = 256, their row strides).
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if full_sig[a].startswith("*") or a in DIVISIBLE_INTS}
        rec = {"name": name, "ok": False}
        try:
            k = triton.compile(ASTSource(fn=fn, signature=full_sig, constexprs=consts, attrs=attrs), target=target,
                               options={"num_warps": warps})
            ptx = k.asm["ptx"]
            rec.update(ok=True, vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
                       scalar_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.b(?:16|32)\s", ptx)),
                       shared_bytes=k.metadata.shared, **_ptxas_usage(ptx, arch))
        except Exception as exc:  # report every kernel, not just the first failure
            rec["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        out.append(rec)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compile every flashdino Triton kernel for a GPU target")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    results = compile_all(args.arch)
    print(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Smoke test of the kernel microbenchmark harness (tiny sizes through the Triton interpreter on CPU)."""
import json
import math

import pytest

from flashdino.profiling.kernel_bench import KERNELS, main, run_benchmarks


def test_bench_writes_json_and_markdown(tmp_path):
    main(["--tiny", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "kernel_bench.json").read_text())
    meta = report["meta"]
    assert meta["date"] and meta["device"] and "kernel_bench" in meta["command"] and "--tiny" in meta["command"]
    assert {"torch", "triton", "python"} <= set(meta["versions"])
    assert report["ceilings"]["copy_gbps"] > 0 and report["ceilings"]["matmul_bf16_tflops"] > 0
    rows = report["results"]
    for kernel in KERNELS:
        impls = {r["impl"] for r in rows if r["kernel"] == kernel}
        assert {"eager", "triton"} <= impls, kernel
    for r in rows:
        assert math.isfinite(r["time_ms"]) and r["time_ms"] > 0
        assert r["speedup_vs_eager"] > 0
        if "gbps" in r:
            assert 0 < r["frac_copy_bw"]
            assert math.isclose(r["frac_copy_bw"], r["gbps"] / report["ceilings"]["copy_gbps"])
    md = (tmp_path / "kernel_bench.md").read_text()
    assert md.count("\n| ") == len(rows) + 1  # header + one line per result
    assert meta["command"] in md


def test_bench_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="unknown kernel"):
        run_benchmarks(["gemm"], tiny=True)


def test_results_are_written_after_each_kernel_family(tmp_path, monkeypatch):
    # A run killed by a session's deadline keeps the families it finished, marked incomplete.
    import flashdino.profiling.kernel_bench as kb

    def killed(*a, **k):
        raise KeyboardInterrupt("the call's deadline")

    monkeypatch.setitem(kb.BENCHES, "simdino", killed)
    with pytest.raises(KeyboardInterrupt):
        run_benchmarks(["ema", "simdino"], tiny=True, out_dir=str(tmp_path), repeats=1, warmup=0)
    report = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert report["meta"]["kernels_done"] == ["ema"] and report["meta"]["complete"] is False
    assert {r["kernel"] for r in report["results"]} == {"ema"} and "commit" in report["meta"]["git"]
    assert "**incomplete**: only ema finished" in (tmp_path / "kernel_bench.md").read_text()

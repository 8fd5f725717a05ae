"""The harnesses on a CUDA GPU (tiny model): CUDA-event timing, allocator peaks, datasheet MFU,
CUDA kernels in the profile, parity in fp32 and bf16. Skipped on CPU-only machines."""
import json

import pytest
import torch

from flashdino.engine.cli import main as cli_main
from flashdino.engine.config import build_config
from flashdino.profiling.harness import SMOKE_OVERRIDES
from flashdino.profiling.parity import TOLERANCES, run_parity
from flashdino.profiling.profile import run_profile

FAST = ["runtime.kernels.ema=triton", "runtime.kernels.coding_rate=triton", "runtime.attention=sdpa"]


@pytest.mark.gpu
def test_bench_on_gpu(tmp_path):
    args = ["bench", "--preset", "simdino_vits16", *SMOKE_OVERRIDES, "train.precision=bf16", *FAST,
            "--steps", "5", "--warmup", "2", "--phase-steps", "2", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["meta"]["device"]["type"] == "cuda" and report["meta"]["device"]["driver"]
    assert "matmul_bf16" in report["ceilings"] and report["ceilings"]["copy"]["gbps"] > 0
    for side in report["sides"].values():
        assert side["peak_mem_mib"]["allocated"] > 0 and side["peak_mem_mib"]["reserved"] >= side["peak_mem_mib"]["allocated"]
        assert side["step_ms"]["n"] == 5 and side["losses_finite"]
        assert side["mfu_measured"] > 0
        if report["peak"]["datasheet"]:
            assert side["mfu"] == side["mfu_datasheet"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parity_on_gpu(precision):
    cfg = build_config("simdinov2_vitb16", overrides=SMOKE_OVERRIDES + [f"train.precision={precision}"] + FAST)
    report = run_parity(cfg, steps=3)
    assert report["tolerances"] == TOLERANCES[precision]
    assert report["ok"], [f for r in report["steps"] for f in r["failures"]]


@pytest.mark.gpu
def test_profile_on_gpu_lists_cuda_kernels(tmp_path):
    cfg = build_config("simdino_vits16", overrides=SMOKE_OVERRIDES + ["train.precision=bf16"] + FAST)
    report = run_profile(cfg, steps=2, warmup=1, out_dir=str(tmp_path))
    assert report["kernel_time"].startswith("device")
    assert report["top_kernels"] and all(0 < k["share_of_step"] <= 1 for k in report["top_kernels"])
    assert not any(k["name"].startswith("aten::") for k in report["top_kernels"])  # kernels, not operators
    assert torch.cuda.is_available() and (tmp_path / "profile.pt.trace.json").exists()

"""flashdino profile on a tiny model (CPU): Chrome trace with the phase ranges, top operators, nsys mode."""
import json

import pytest

from flashdino.engine.cli import main as cli_main
from flashdino.engine.config import build_config
from flashdino.profiling.harness import SMOKE_OVERRIDES
from flashdino.profiling.profile import run_profile

PHASES_IN_A_STEP = {"data_wait", "h2d", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema"}


def test_profile_writes_trace_top_kernels_and_phases(tmp_path):
    args = ["profile", "--preset", "simdinov2_vitb16", *SMOKE_OVERRIDES, "--steps", "2", "--warmup", "1",
            "--top", "10", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    trace = json.loads((tmp_path / "profile.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert PHASES_IN_A_STEP <= names  # every phase is a range in the trace (and an NVTX range)
    assert set(report["phases"]) == PHASES_IN_A_STEP
    assert report["step_ms"]["n"] == 2 and report["config"]["side"] == "engine"
    top = report["top_kernels"]
    assert 0 < len(top) <= 10
    assert all(r["name"] not in PHASES_IN_A_STEP and r["name"].startswith("aten::") for r in top)
    assert all(0 < r["share_of_step"] <= 1 for r in top)
    assert [r["total_us"] for r in top] == sorted((r["total_us"] for r in top), reverse=True)
    md = (tmp_path / "profile.md").read_text()
    assert "| teacher_forward |" in md and top[0]["name"][:40] in md and "nsys profile" in md


def test_nsys_mode_runs_without_torch_profiler(tmp_path):
    cfg = build_config("simdino_vits16", overrides=SMOKE_OVERRIDES)
    report = run_profile(cfg, reference=True, steps=1, warmup=0, out_dir=str(tmp_path), nsys=True)
    assert report["trace"] is None and report["top_kernels"] == [] and report["mode"].startswith("nsys")
    assert set(report["phases"]) == PHASES_IN_A_STEP and report["config"]["side"] == "reference"
    with pytest.raises(ValueError, match="emit-nvtx"):
        run_profile(cfg, steps=1, out_dir=str(tmp_path), emit_nvtx=True)

"""flashdino bench on a tiny model (CPU) and the pieces it is built from: FLOP counts against a
hand count, step statistics, per-phase timing, the regression guard."""
import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flashdino.engine.cli import main as cli_main
from flashdino.engine.config import build_config
from flashdino.engine.models import build_backbone, build_head
from flashdino.profiling import ranges
from flashdino.profiling.flops import datasheet_peak, head_forward_flops, peak_dtype, vit_forward_flops
from flashdino.profiling.harness import (SMOKE_OVERRIDES, config_hash, harness_config, reference_config,
                                         synthetic_batch)
from flashdino.profiling.regression import IncomparableResults, compare
from flashdino.profiling.timing import percentile, summarize

PHASES_IN_A_STEP = {"data_wait", "h2d", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema"}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--preset", "simdino_vits16", *SMOKE_OVERRIDES, "train.precision=fp32",
            "runtime.kernels.ema=triton", "--steps", "3", "--warmup", "1", "--phase-steps", "2", "--out", str(out)]
    assert cli_main(args) == 0
    return out, json.loads((out / "bench.json").read_text())


def test_bench_report_is_complete_and_consistent(bench_run):
    out, report = bench_run
    meta = report["meta"]
    assert meta["device"]["name"] and meta["versions"]["torch"] == torch.__version__
    assert "--phase-steps" in meta["command"] and meta["git"]["commit"]
    assert report["config"]["engine_vs_reference"]["runtime.kernels.ema"] == ["triton", "eager"]
    flops = report["flops"]["per_step"]
    assert flops > 0 and report["flops"]["by_op"]
    peak = report["peak"]["measured"]["tflops"] * 1e12
    for name in ("engine", "reference"):
        side = report["sides"][name]
        st = side["step_ms"]
        assert st["n"] == 3 and st["p10"] <= st["median"] <= st["p90"]
        assert st["min"] <= st["p10"] and st["p90"] <= st["max"]
        # images/s is the batch over the measured step times; MFU is FLOP/s over the ceiling.
        assert side["images_per_s"] == pytest.approx(4 * 3 / (sum(side["step_times_ms"]) / 1e3))
        assert side["mfu"] == pytest.approx(flops * side["images_per_s"] / 4 / peak)
        assert side["mfu"] == side["mfu_measured"] and side["mfu_datasheet"] is None  # no datasheet for a CPU
        assert set(side["phases"]) == PHASES_IN_A_STEP
        assert all(0 < p["share"] <= 1 for p in side["phases"].values())
        assert side["phase_other_ms"] >= 0  # the trainer's phases are not nested
        assert side["losses_finite"] and "total_loss" in side["final_losses"]
        assert side["warmup_s"] > 0 and side["first_step_s"] > 0
    assert report["sides"]["engine"]["init_max_abs_diff"] == 0.0
    assert report["speedup"] == pytest.approx(report["sides"]["engine"]["images_per_s"]
                                              / report["sides"]["reference"]["images_per_s"])
    assert report["ceilings"]["copy"]["gbps"] > 0 and report["ceilings"]["matmul_fp32"]["tflops"] > 0
    assert "fp32" in report["ceilings"]["note"]
    md = (out / "bench.md").read_text()
    assert meta["command"] in md and "| engine |" in md and "| reference |" in md and "Speedup" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regression_guard_cli_on_bench_results(bench_run, tmp_path):
    out, report = bench_run
    base = out / "bench.json"
    assert cli_main(["bench", "--compare", str(base), "--baseline", str(base)]) == 0
    slower = copy.deepcopy(report)
    slower["sides"]["engine"]["images_per_s"] *= 0.93
    slower["sides"]["engine"]["mfu"] *= 0.93
    (tmp_path / "slower.json").write_text(json.dumps(slower))
    assert cli_main(["bench", "--compare", str(tmp_path / "slower.json"), "--baseline", str(base)]) == 1
    other = copy.deepcopy(report)
    other["meta"]["device"]["name"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cli_main(["bench", "--compare", str(tmp_path / "other.json"), "--baseline", str(base)]) == 2
    assert cli_main(["bench", "--compare", str(tmp_path / "other.json"), "--baseline", str(base),
                     "--allow-mismatch"]) == 0
    assert cli_main(["bench", "--compare", str(base), "--baseline", str(tmp_path / "missing.json")]) == 2


def _fake(images_per_s=100.0, mfu=0.4, mem=1000.0):
    return {"kind": "flashdino.bench", "meta": {"device": {"name": "GPU X"}}, "config": {"hash": "abc"},
            "workload": {"data": "synthetic"}, "speedup": 2.0,
            "sides": {"engine": {"images_per_s": images_per_s, "mfu": mfu, "step_ms": {"median": 10.0},
                                 "peak_mem_mib": {"allocated": mem}},
                      "reference": {"images_per_s": 50.0}}}


def test_regression_thresholds():
    base = _fake()
    assert compare(_fake(images_per_s=96.0, mfu=0.384), base)["ok"]  # 4% slower: noise
    result = compare(_fake(images_per_s=94.0, mfu=0.376), base)
    assert not result["ok"] and set(result["regressions"]) == {"engine images/s", "engine MFU"}
    assert compare(_fake(images_per_s=150.0, mfu=0.6, mem=900.0), base)["ok"]  # faster and smaller
    assert compare(_fake(mem=1060.0), base)["regressions"] == ["engine peak memory (MiB)"]
    assert not compare(_fake(images_per_s=97.0), base, threshold=0.02)["ok"]
    other = _fake()
    other["config"]["hash"] = "def"
    with pytest.raises(IncomparableResults, match="config_hash"):
        compare(other, base)
    with pytest.raises(ValueError, match="threshold"):
        compare(base, base, threshold=5)


# ------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("style,registers,img", [("v1", 0, 32), ("v2", 4, 48)])
def test_flop_counter_matches_the_hand_count_of_a_vit(style, registers, img):
    cfg = build_config("demo", overrides=[f"model.style={style}", f"model.num_register_tokens={registers}",
                                          "model.depth=2", "model.embed_dim=48", "model.num_heads=3",
                                          "model.patch_size=8", "model.img_size=32", "model.mlp_ratio=3.0",
                                          "crops.global_size=32", "crops.local_size=16"])
    backbone = build_backbone(cfg.model, attention="math")
    x = torch.randn(3, 3, img, img)
    with FlopCounterMode(display=False) as counter:
        backbone.forward_features(x)
    assert counter.get_total_flops() == vit_forward_flops(backbone, 3, img)
    # By hand for these sizes: tokens T = (img/8)^2 + 1 + R, D = 48, hidden 144, 2 blocks.
    t = (img // 8) ** 2 + 1 + registers
    per_block = 2 * 3 * t * 48 * (3 * 48) + 4 * 3 * t * t * 48 + 2 * 3 * t * 48 * 48 + 4 * 3 * t * 48 * 144
    assert vit_forward_flops(backbone, 3, img) == 2 * 3 * (img // 8) ** 2 * 48 * 3 * 64 + 2 * per_block
    head = build_head(cfg.head, 48, "simdino")
    z = torch.randn(5, 48)
    with FlopCounterMode(display=False) as counter:
        head(z)
    assert counter.get_total_flops() == head_forward_flops(head, 5)


def test_peak_tables():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16")["tflops"] == 989.4
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16")["tflops"] == 756.0
    assert datasheet_peak("NVIDIA H200", "tf32")["tflops"] == 494.7
    assert datasheet_peak("CPU (x86_64)", "fp32") is None
    assert peak_dtype("bf16", tf32=True) == "bf16"
    assert peak_dtype("fp32", tf32=True) == "tf32" and peak_dtype("fp32", tf32=False) == "fp32"


# ------------------------------------------------------------------------------ timing


def test_percentiles_by_hand():
    times = [float(v) for v in (7, 1, 3, 9, 5, 11, 2, 4, 6, 8, 10)]  # 1..11 shuffled
    assert percentile(times, 50) == 6.0 and percentile(times, 10) == 2.0 and percentile(times, 90) == 10.0
    assert percentile([1.0, 2.0], 25) == 1.25  # linear interpolation
    s = summarize(times)
    assert (s["median"], s["p10"], s["p90"], s["mean"], s["min"], s["max"], s["n"]) == (6.0, 2.0, 10.0, 6.0, 1.0, 11.0, 11)
    with pytest.raises(ValueError, match="no step times"):
        summarize([])


def test_phase_timer_counts_nested_phases_and_restores_state():
    assert not ranges.is_enabled()
    with ranges.PhaseTimer("cpu") as timer:
        for _ in range(3):
            with ranges.phase("backward"):
                with ranges.phase("custom_inner"):
                    pass
            with ranges.phase("ema"):
                pass
    assert not ranges.is_enabled()
    summary = timer.summary()
    assert list(summary) == ["backward", "ema", "custom_inner"]  # PHASES order, then others
    assert all(s["count"] == 3 and s["total_ms"] >= 0 for s in summary.values())
    assert summary["backward"]["total_ms"] >= summary["custom_inner"]["total_ms"]
    assert summary["custom_inner"]["top_level_ms"] == 0.0  # nested: not counted again at the top level
    assert summary["backward"]["top_level_ms"] == summary["backward"]["total_ms"]
    with ranges.phase("ema"):  # off again: a no-op
        pass
    assert timer.summary()["ema"]["count"] == 3


def test_phase_timer_rejects_a_second_timer_and_bad_nesting():
    with ranges.PhaseTimer("cpu") as timer:
        with pytest.raises(RuntimeError, match="already enabled"):
            ranges.PhaseTimer("cpu").start()
        with pytest.raises(RuntimeError, match="closed while"):
            timer._exit("loss")
    assert not ranges.is_enabled()


# ------------------------------------------------------------------------------ harness


def test_reference_config_and_hash():
    cfg = build_config("simdino_vits16", overrides=SMOKE_OVERRIDES + ["runtime.compile=block", "runtime.kernels.ema=triton",
                                                                      "runtime.attention=flash", "runtime.multicrop=packed"])
    ref, missing = reference_config(cfg)
    assert (ref.runtime.compile, ref.runtime.kernels.ema, ref.runtime.kernels.centering, ref.runtime.kernels.coding_rate,
            ref.runtime.attention, ref.runtime.distributed, ref.runtime.multicrop) == (
        "none", "eager", "eager", "eager", "math", "none", "grouped")
    assert missing == [] and cfg.runtime.compile == "block"  # the user's config is untouched
    moved = build_config("simdino_vits16", overrides=SMOKE_OVERRIDES + ["runtime.compile=block", "runtime.kernels.ema=triton",
                                                                        "runtime.attention=flash", "runtime.multicrop=packed",
                                                                        "train.output_dir=/x"])
    assert config_hash(moved) == config_hash(cfg) != config_hash(ref)


def test_synthetic_batches_have_the_loader_layout():
    cfg = harness_config(build_config("simdinov2_vitb16", overrides=SMOKE_OVERRIDES))
    b = synthetic_batch(cfg, torch.device("cpu"), index=3, seed=1)
    assert b["global_crops"].shape == (8, 3, 32, 32) and b["local_crops"].shape == (8, 3, 16, 16)
    masks = b["masks"]
    assert masks.dtype == torch.bool and masks.shape == (8, 16)
    assert torch.equal(b["mask_indices"], masks.reshape(-1).nonzero().reshape(-1))
    per_crop = torch.zeros(8).index_add_(0, b["mask_indices"] // 16, b["mask_weights"])
    masked = masks.any(dim=1)
    assert torch.allclose(per_crop[masked], torch.ones(int(masked.sum()))) and masked.sum() == 4  # probability 0.5
    again = synthetic_batch(cfg, torch.device("cpu"), index=3, seed=1)
    assert torch.equal(again["global_crops"], b["global_crops"]) and torch.equal(again["masks"], masks)
    assert not torch.equal(synthetic_batch(cfg, torch.device("cpu"), index=4, seed=1)["global_crops"], b["global_crops"])
    assert cfg.data.dataset == "synthetic" and cfg.data.synthetic_size >= 4 * 4 and not cfg.train.resume


def test_latest_table_renders_a_real_bench_result(bench_run):
    from flashdino.profiling.report import latest_table

    out, report = bench_run
    table = latest_table(str(out), include_cpu=True)
    row = next(line for line in table.splitlines() if report["config"]["label"] in line)
    assert f"{report['sides']['engine']['images_per_s']:.1f}" in row and f"{report['speedup']:.2f}x" in row
    assert "No bench results (GPU)" in latest_table(str(out))  # CPU runs are not listed by default


def test_bench_kernels_mode_runs_the_kernel_microbenchmarks(tmp_path):
    assert cli_main(["bench", "--kernels", "sinkhorn", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernel_bench.json").read_text())
    assert {r["impl"] for r in report["results"]} == {"eager", "triton"}
    assert "--kernels sinkhorn" in report["meta"]["command"]
    assert cli_main(["bench", "--kernels", "gemm", "--out", str(tmp_path)]) == 2


def test_bench_through_the_real_data_pipeline_engine_only(tmp_path):
    # 4 batches per epoch and 5 steps: the loader wraps into a second epoch; data_wait is measured.
    args = ["bench", "--preset", "simdino_vits16", *SMOKE_OVERRIDES, "data.dataset=synthetic", "data.synthetic_size=16",
            "data.num_workers=0", "--data", "pipeline", "--sides", "engine", "--steps", "3", "--warmup", "1",
            "--phase-steps", "1", "--no-ceilings", "--no-chart", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["sides"]) == ["engine"] and report["speedup"] is None
    engine = report["sides"]["engine"]
    assert engine["phases"]["data_wait"]["ms_per_step"] > 0 and engine["mfu"] is None  # no ceiling measured
    assert report["workload"]["data"] == "pipeline" and report["flops"]["per_step"] > 0
    assert not (tmp_path / "bench.png").exists()


def test_turning_phase_marking_on_does_not_recompile_a_compiled_step():
    # A compiled region that marks phases must not guard on the marking switch (under
    # runtime.compile=full that was a full recompile of the step inside the timed phase steps).
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def step(x):
        with ranges.phase("loss"):
            return (x * 2).sum()

    x = torch.randn(8)
    step(x)
    with ranges.PhaseTimer("cpu"):
        step(x)
    step(x)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_median_time_ms_times_each_call_after_the_warmup():
    from flashdino.profiling.timing import median_time_ms

    calls = []
    durations = iter([0.0, 0.0, 0.030, 0.001, 0.002])  # two warm-up calls, then three timed

    def fn():
        import time

        calls.append(1)
        time.sleep(next(durations))

    ms = median_time_ms(fn, "cpu", repeats=3, warmup=2)
    assert len(calls) == 5
    assert 1.5 <= ms < 25.0  # the median of (30, 1, 2) ms: the slow first timed call does not count
    with pytest.raises(ValueError, match="repeats"):
        median_time_ms(fn, "cpu", repeats=0)


def test_median_time_ms_runs_before_outside_the_timed_span():
    import time

    from flashdino.profiling.timing import median_time_ms

    order = []
    ms = median_time_ms(lambda: order.append("fn"), "cpu", repeats=3, warmup=1,
                        before=lambda: (order.append("before"), time.sleep(0.02)))
    assert order == ["fn"] + ["before", "fn"] * 3  # not ahead of the warm-up call
    assert ms < 10.0  # the 20 ms of before() are not in the time


def test_bench_variant_is_a_third_side_from_the_same_weights(tmp_path):
    args = ["bench", "--preset", "simdino_vits16", *SMOKE_OVERRIDES, "train.precision=fp32", "model.drop_path_rate=0",
            "--sides", "engine", "--steps", "2", "--warmup", "1", "--phase-steps", "0", "--no-ceilings",
            "--out", str(tmp_path), "--variant", "runtime.multicrop=packed"]
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["sides"]) == ["engine", "variant"]
    engine, variant = report["sides"]["engine"], report["sides"]["variant"]
    assert variant["init_max_abs_diff"] == 0.0 and variant["losses_finite"]
    assert report["variant"]["variant_vs_engine"] == {"runtime.multicrop": ["packed", "grouped"]}
    assert report["variant"]["speedup_vs_engine"] == pytest.approx(variant["images_per_s"] / engine["images_per_s"])
    # Same weights, same batches, the same math (no drop path): the losses agree.
    for name, value in engine["final_losses"].items():
        assert variant["final_losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    md = (tmp_path / "bench.md").read_text()
    assert "| variant |" in md and "runtime.multicrop=packed" in md


@pytest.mark.parametrize("variant,message", [(["runtime.multicrop=grouped"], "unchanged"),
                                              (["runtime.multicrop=stacked"], "multicrop")])
def test_bench_refuses_a_variant_before_measuring_anything(tmp_path, capsys, variant, message):
    args = ["bench", "--preset", "simdino_vits16", *SMOKE_OVERRIDES, "--out", str(tmp_path), "--variant", *variant]
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_each_harness_trainer_compiles_from_scratch_and_the_environment_is_recorded(monkeypatch):
    """A second trainer of the same compiled config in one process (the suite's bench after its
    parity stage) must compile its own graphs, or its compile time reads ~0 and it runs graphs built
    under the other stage's settings; the compile-backend override must show in the metadata."""
    from flashdino.profiling import env, harness

    monkeypatch.setenv("FLASHDINO_COMPILE_BACKEND", "aot_eager")
    cfg = harness.harness_config(build_config("simdino_vits16", overrides=SMOKE_OVERRIDES + [
        "train.precision=fp32", "runtime.compile=block"]), "synthetic")
    reports = []
    for _ in range(2):
        trainer = harness.build_trainer(cfg)
        harness.run_step(trainer, next(harness.synthetic_batches(cfg, trainer.device, pool=1, seed=0)))
        reports.append(trainer.compile_report)
        del trainer
    assert reports[0].graphs > 0 and reports[1].graphs == reports[0].graphs
    assert env.run_metadata(torch.device("cpu"))["environment"]["FLASHDINO_COMPILE_BACKEND"] == "aot_eager"

"""flashdino parity on a tiny model (CPU): passes on the engine's fast paths, is bit-exact for
identical configs (same init, data and RNG on both sides), and fails with exit 1 on a difference."""
import json
import math

import numpy as np
import pytest
import torch

from flashdino.engine.cli import main as cli_main
from flashdino.engine.config import build_config
from flashdino.profiling.harness import SMOKE_OVERRIDES
from flashdino.profiling.parity import (TOLERANCES, run_parity, scalar_rel_err, tensor_rel_err, to_markdown,
                                        tolerances_for)


def tiny(preset, *extra):
    return build_config(preset, overrides=SMOKE_OVERRIDES + ["train.precision=fp32"] + list(extra))


def test_fast_paths_pass_fp32_tolerance_and_cli_writes_reports(tmp_path):
    # Triton EMA + fused SimDINO loss (interpreter on CPU) + SDPA attention vs eager/math.
    args = ["parity", "--preset", "simdino_vits16", *SMOKE_OVERRIDES, "train.precision=fp32",
            "runtime.kernels.ema=triton", "runtime.kernels.coding_rate=triton", "model.drop_path_rate=0.1",
            "--steps", "3", "--out", str(tmp_path)]
    assert cli_main(args) == 0
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["ok"] and report["tolerances"] == TOLERANCES["fp32"]
    diffs = report["config"]["engine_vs_reference"]
    assert diffs["runtime.kernels.ema"] == ["triton", "eager"] and diffs["runtime.attention"] == ["sdpa", "math"]
    assert report["init_max_abs_diff"] == 0.0
    assert len(report["steps"]) == 3
    for rec in report["steps"]:
        assert {"total_loss", "comp_loss", "expa_loss"} <= set(rec["losses"])
        assert rec["max_loss_rel_err"] <= 1e-5 and rec["max_grad_norm_rel_err"] <= 1e-5
        assert rec["params"]["student"]["rel_err"] <= 1e-5 and rec["params"]["teacher"]["rel_err"] <= 1e-5
        assert {"backbone", "head", "student"} <= set(rec["grad_norms"])
        assert any(k.startswith("group") for k in rec["grad_norms"])
    # The engine really ran different code: something differs, just within tolerance.
    assert max(r["params"]["student"]["rel_err"] for r in report["steps"]) > 0
    md = (tmp_path / "parity.md").read_text()
    assert "Result: PASS" in md and md.count("| ok |") == 3


def test_identical_configs_are_bit_exact_with_drop_path_and_masks():
    # SimDINOv2: iBOT masks, drop path (global RNG), per-module clipping. Any misalignment of init,
    # batches or RNG between the two sides would show up as a non-zero error.
    cfg = tiny("simdinov2_vitb16", "model.drop_path_rate=0.2", "runtime.attention=math", "runtime.distributed=none")
    report = run_parity(cfg, steps=2)
    assert report["ok"]
    assert report["config"]["engine_vs_reference"] == {}
    for rec in report["steps"]:
        assert rec["max_loss_rel_err"] == 0.0 and rec["max_grad_norm_rel_err"] == 0.0
        assert all(p["rel_err"] == 0.0 for p in rec["params"].values())
        assert "ibot_comp_loss" in rec["losses"]


def test_a_real_difference_fails_and_names_it():
    engine = tiny("dino_vits16", "runtime.attention=math", "runtime.distributed=none", "optim.warmup_epochs=0")
    reference = tiny("dino_vits16", "runtime.attention=math", "runtime.distributed=none", "optim.warmup_epochs=0",
                     "optim.base_lr=0.00051")  # 2% larger LR on the reference side
    report = run_parity(engine, steps=2, reference_cfg=reference)
    assert not report["ok"]
    assert report["config"]["engine_vs_reference"]["optim.base_lr"] == [0.0005, 0.00051]
    step0, step1 = report["steps"]
    # Step 0: same weights in, so the same losses; only the update differs (by ~2% of an LR-sized
    # step: far below the parameter tolerance, which is why losses and grad norms are checked too).
    assert step0["losses"]["total_loss"]["rel_err"] == 0.0 and step0["params"]["student"]["rel_err"] > 0
    assert report["first_failure_step"] == 1
    assert any(f.startswith("loss 'total_loss'") for f in step1["failures"])
    assert any(f.startswith("grad norm") for f in step1["failures"])


def test_cli_exit_code_is_1_when_tolerance_exceeded(tmp_path):
    args = ["parity", "--preset", "dino_vits16", *SMOKE_OVERRIDES, "train.precision=fp32",
            "runtime.kernels.ema=triton", "--steps", "1", "--rtol", "1e-15", "--out", str(tmp_path)]
    assert cli_main(args) == 1
    report = json.loads((tmp_path / "parity.json").read_text())
    assert not report["ok"] and report["tolerances"] == {"loss": 1e-15, "grad_norm": 1e-15, "param": 1e-15}
    assert "Result: FAIL" in (tmp_path / "parity.md").read_text()


def test_an_engine_that_raises_is_a_failure_not_a_crash(monkeypatch):
    from flashdino.engine.trainer import Trainer

    real_step = Trainer.train_step

    def failing_step(self, batch):
        if self.cfg.runtime.kernels.ema == "triton" and self.state.step == 1:
            raise RuntimeError("kernel exploded")
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    report = run_parity(tiny("simdino_vits16", "runtime.kernels.ema=triton"), steps=3)
    assert not report["ok"] and report["first_failure_step"] == 1 and len(report["steps"]) == 2
    assert "kernel exploded" in report["engine_error"]
    assert "the engine step raised RuntimeError: kernel exploded" in to_markdown(report)


def test_error_measures_against_float64_numpy():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(7, 5))
    a = b + rng.normal(scale=1e-4, size=b.shape)
    expected = np.sqrt(((a - b) ** 2).sum()) / np.sqrt((b ** 2).sum())
    assert math.isclose(tensor_rel_err(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)),
                        expected, rel_tol=1e-3)
    assert scalar_rel_err(1.5, 2.0) == 0.25
    assert scalar_rel_err(1e-9, 0.0) == pytest.approx(1e-3)  # floor 1e-6 for a zero reference
    assert scalar_rel_err(float("nan"), 1.0) == math.inf
    assert tensor_rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        tensor_rel_err(torch.zeros(2), torch.zeros(3))


def test_tolerances_by_dtype():
    assert tolerances_for("fp32") == {"loss": 1e-5, "grad_norm": 1e-5, "param": 1e-5}
    assert tolerances_for("bf16")["loss"] > tolerances_for("fp16")["loss"] > tolerances_for("fp32")["loss"]
    assert tolerances_for("fp32", {"param": 1e-3})["param"] == 1e-3
    with pytest.raises(ValueError, match="no tolerances for precision"):
        tolerances_for("fp8")
    with pytest.raises(ValueError, match="unknown tolerance"):
        tolerances_for("fp32", {"weights": 1.0})


def test_compiled_engine_gets_eager_random_draws_only_during_parity(monkeypatch):
    import torch._inductor.config as inductor_config

    from flashdino.profiling import parity

    seen = []

    def fake_lockstep(*args):
        seen.append(inductor_config.fallback_random)
        raise RuntimeError("stop here")

    monkeypatch.setattr(parity, "_lockstep", fake_lockstep)
    before = inductor_config.fallback_random
    with pytest.raises(RuntimeError, match="stop here"):
        run_parity(tiny("simdino_vits16", "runtime.compile=block"), steps=1)
    assert seen == [True] and inductor_config.fallback_random == before


def test_compare_states_against_an_independent_float64_computation():
    from types import SimpleNamespace

    from flashdino.profiling.parity import compare_states

    def side(seed):
        g = torch.Generator().manual_seed(seed)
        m = torch.nn.Module()
        m.student = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        m.teacher = torch.nn.Linear(5, 4)
        m.register_buffer("center", torch.randn(1, 9, generator=g))
        for p in list(m.student.parameters()) + list(m.teacher.parameters()):
            p.data = torch.randn(p.shape, generator=g)
        return m

    ref, eng = side(1), side(1)
    with torch.no_grad():
        eng.student[1].weight.add_(torch.randn(3, 7) * 1e-3)
        eng.student[0].bias.add_(torch.randn(7) * 1e-2)
        eng.center.mul_(1.5)
    r, e = SimpleNamespace(model=ref, device=torch.device("cpu")), SimpleNamespace(model=eng, device=torch.device("cpu"))
    got = compare_states(e, r)

    def expect(a_mod, b_mod):
        a = {k: v.double() for k, v in a_mod.state_dict().items()}
        b = {k: v.double() for k, v in b_mod.state_dict().items()}
        per = {k: ((a[k] - b[k]).norm() / b[k].norm()).item() for k in b}
        total = math.sqrt(sum(((a[k] - b[k]) ** 2).sum().item() for k in b)) / math.sqrt(sum((b[k] ** 2).sum().item() for k in b))
        return total, per

    total, per = expect(eng.student, ref.student)
    assert got["student"]["rel_err"] == pytest.approx(total, rel=1e-12)
    assert got["student"]["max_tensor_rel_err"] == pytest.approx(max(per.values()), rel=1e-12)
    assert got["student"]["worst_tensor"] == max(per, key=per.get) and got["student"]["tensors"] == 4
    assert got["teacher"]["rel_err"] == 0.0 and got["teacher"]["worst_tensor"] == "weight"
    a, b = eng.center.double(), ref.center.double()
    assert got["buffers"]["rel_err"] == pytest.approx(((a - b).norm() / b.norm()).item(), rel=1e-12)
    assert got["buffers"]["rel_err"] == pytest.approx(0.5, rel=1e-6)
    with torch.no_grad():
        eng.teacher.bias[0] = float("nan")
    bad = compare_states(e, r)["teacher"]
    assert bad["rel_err"] == math.inf and bad["max_tensor_rel_err"] == math.inf and bad["worst_tensor"] == "bias"


def test_time_limit_stops_early_writes_what_was_compared_and_fails(tmp_path, monkeypatch):
    # A run cut by an outer deadline wrote nothing; with --time-limit it stops between steps, keeps
    # the compared steps, and fails as incomplete (its steps alone cannot pass a 200-step check).
    import flashdino.profiling.parity as parity_mod

    clock = iter(float(t) for t in range(0, 1000, 10))  # every reading 10 s later than the last
    from types import SimpleNamespace

    monkeypatch.setattr(parity_mod, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    args = ["parity", "--preset", "simdino_vits16", *SMOKE_OVERRIDES, "train.precision=fp32", "--steps", "6",
            "--time-limit", "25", "--out", str(tmp_path)]
    assert cli_main(args) == 1
    report = json.loads((tmp_path / "parity.json").read_text())
    assert not report["ok"] and report["stopped_early"].startswith("time limit of 25 s reached after 3 of 6 steps")
    assert len(report["steps"]) == 3 and all(r["ok"] for r in report["steps"])
    assert "FAIL (incomplete: time limit" in (tmp_path / "parity.md").read_text()
    assert cli_main(["parity", "--preset", "demo", "--time-limit", "0"]) == 2


def test_packed_engine_passes_against_the_grouped_reference_with_drop_path(tmp_path):
    # Packed multi-crop draws stochastic depth in the grouped order, so even with drop path on the
    # two sides take the same steps.
    report = run_parity(tiny("simdinov2_vitb16", "runtime.multicrop=packed", "model.drop_path_rate=0.3"), steps=2)
    assert report["config"]["engine_vs_reference"]["runtime.multicrop"] == ["packed", "grouped"]
    assert report["ok"], to_markdown(report)
    assert max(r["params"]["student"]["rel_err"] for r in report["steps"]) > 0  # packing really ran

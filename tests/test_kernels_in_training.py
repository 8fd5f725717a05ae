"""The Triton kernels selected through runtime.kernels.* give the eager training step's numbers.

Runs the full training step (tiny models, CPU, Triton interpreter) once with every kernel on
`eager` and once on `triton`, from the same initialization and data, for every method.
"""
import os

import pytest
import torch

from flashdino.engine.config import build_config
from flashdino.engine.trainer import Trainer

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)

TINY = [
    "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=8", "model.img_size=32",
    "model.drop_path_rate=0.0", "head.hidden_dim=32", "head.bottleneck_dim=16", "head.n_prototypes=64",
    "crops.global_size=32", "crops.local_size=16", "crops.n_local=2", "data.dataset=synthetic",
    "data.synthetic_size=16", "data.batch_size=4", "data.num_workers=0", "optim.epochs=2",
    "optim.warmup_epochs=1", "train.log_every=1", "train.checkpoint_every=0", "train.precision=fp32",
    "train.max_steps=2", "log.tensorboard=false", "log.progress_bar=false", "log.plots=false",
]
TRITON = ["runtime.kernels.ema=triton", "runtime.kernels.centering=triton", "runtime.kernels.coding_rate=triton"]


def _losses(tmp_path, preset, extra):
    cfg = build_config(preset, overrides=TINY + [f"train.output_dir={tmp_path}"] + extra)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    from flashdino.engine.metrics import read_jsonl

    trainer.fit()
    records = read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
    return records, trainer


@pytest.mark.parametrize("preset,extra", [
    ("simdino_vits16", []),
    ("simdinov2_vitb16", []),
    ("dino_vits16", []),
    ("dino_vits16", ["objective.centering=sinkhorn_knopp"]),
    ("dinov2_vitb16", []),
])
def test_triton_kernels_match_eager_training(tmp_path, preset, extra):
    eager, t_eager = _losses(tmp_path / "eager", preset, extra)
    fused, t_fused = _losses(tmp_path / "triton", preset, extra + TRITON)
    for a, b in zip(eager, fused):
        for key in a:
            if key.endswith("loss"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for name, p in t_eager.model.teacher.state_dict().items():
        assert torch.allclose(t_fused.model.teacher.state_dict()[name], p, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("preset", ["simdino_vits16", "dinov2_vitb16"])
def test_fused_adamw_ema_optimizer_matches_torch_adamw_then_ema(tmp_path, preset):
    """runtime.kernels.optimizer=fused_adamw_ema: AdamW + EMA in one Triton pass, same numbers."""
    eager, t_eager = _losses(tmp_path / "eager", preset, [])
    fused, t_fused = _losses(tmp_path / "fused", preset, ["runtime.kernels.optimizer=fused_adamw_ema"])
    assert t_fused.runtime.ema is None and type(t_fused.runtime.optimizer).__name__ == "FusedAdamWEMA"
    for a, b in zip(eager, fused):
        assert b["total_loss"] == pytest.approx(a["total_loss"], rel=1e-5, abs=1e-6)
    for part in ("student", "teacher"):
        ref, got = getattr(t_eager.model, part).state_dict(), getattr(t_fused.model, part).state_dict()
        for name, p in ref.items():
            assert torch.allclose(got[name], p, rtol=1e-5, atol=1e-6), (part, name)


def test_fused_adamw_ema_resume_is_exact(tmp_path):
    extra = ["runtime.kernels.optimizer=fused_adamw_ema", "train.max_steps=4"]
    _, straight = _losses(tmp_path / "a", "simdino_vits16", extra)
    _losses(tmp_path / "b", "simdino_vits16", ["runtime.kernels.optimizer=fused_adamw_ema", "train.max_steps=2"])
    _, resumed = _losses(tmp_path / "b", "simdino_vits16", extra)
    assert resumed.state.step == 4
    for part in ("student", "teacher"):
        for name, p in getattr(straight.model, part).state_dict().items():
            assert torch.equal(getattr(resumed.model, part).state_dict()[name], p), (part, name)



def _fp16_run_with_an_overflow_at_step_3(tmp_path, extra):
    """fp16 training whose third backward yields an inf gradient (after the teacher has left the
    student's initial weights), which the GradScaler must skip."""
    cfg = build_config("simdino_vits16", overrides=TINY + [f"train.output_dir={tmp_path}", "train.precision=fp16",
                                                             "train.max_steps=5"] + extra)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    # Scale 1 instead of 65536: this tiny model's fp16 gradients (up to ~35) overflow every step at
    # the default scale, which would leave the student and teacher equal and the EMA a no-op.
    trainer.runtime.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    backward, calls = trainer.runtime.backward, []

    def backward_with_overflow(loss):
        backward(loss)
        calls.append(1)
        if len(calls) == 3:
            next(p for p in trainer.model.student.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

    trainer.runtime.backward = backward_with_overflow
    trainer.fit()
    return trainer


def test_fused_adamw_ema_keeps_the_ema_on_steps_the_grad_scaler_skips(tmp_path):
    """The eager path (and the reference) runs its separate EMA after a step the GradScaler skipped;
    the fused optimizer must too, or the teachers part."""
    eager = _fp16_run_with_an_overflow_at_step_3(tmp_path / "eager", [])
    fused = _fp16_run_with_an_overflow_at_step_3(tmp_path / "fused", ["runtime.kernels.optimizer=fused_adamw_ema"])
    assert fused.runtime.optimizer.steps_taken == 4, "step 3 alone must be skipped"
    assert fused.runtime.scaler.get_scale() == eager.runtime.scaler.get_scale()
    for part in ("student", "teacher"):
        ref, got = getattr(eager.model, part).state_dict(), getattr(fused.model, part).state_dict()
        for name, p in ref.items():
            assert torch.allclose(got[name], p, rtol=1e-5, atol=1e-6), (part, name)

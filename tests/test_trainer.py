"""End-to-end training on the CPU: every method runs, resume is bit-exact, faults lose nothing."""
import hashlib
import os

import pytest
import torch

from flashdino.engine import checkpoint as ckpt
from flashdino.engine.config import ConfigError, build_config
from flashdino.engine.finite_guard import NonFiniteLossError
from flashdino.engine.trainer import Trainer

TINY = [
    "model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    "model.img_size=32", "head.hidden_dim=32", "head.bottleneck_dim=16", "crops.global_size=32",
    "crops.local_size=16", "crops.n_local=2", "data.dataset=synthetic", "data.synthetic_size=48",
    "data.batch_size=4", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1",
    "train.log_every=1", "train.checkpoint_every=0", "log.tensorboard=false", "log.progress_bar=false",
    "log.plots=false",
]


def tiny_config(tmp_path, preset="simdino_vits16", *extra):
    overrides = TINY + [f"train.output_dir={tmp_path}", "train.precision=fp32"] + list(extra)
    if preset.startswith("dino"):
        overrides.append("head.n_prototypes=64")
    return build_config(preset, overrides=overrides)


@pytest.mark.parametrize("preset", ["simdino_vits16", "simdinov2_vitb16", "dino_vits16", "dinov2_vitb16"])
def test_each_method_trains_and_updates_teacher(tmp_path, preset):
    cfg = tiny_config(tmp_path, preset, "train.max_steps=3")
    trainer = Trainer(cfg)
    teacher_before = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary["last_metrics"].items() if k.endswith("loss"))
    changed = [k for k, v in trainer.model.teacher.state_dict().items() if not torch.equal(v, teacher_before[k])]
    assert changed, "the EMA never moved the teacher"
    assert ckpt.find_latest(str(tmp_path))


def _run(tmp_path, max_steps, num_workers=0):
    cfg = tiny_config(tmp_path, "simdinov2_vitb16", f"train.max_steps={max_steps}", f"data.num_workers={num_workers}")
    trainer = Trainer(cfg)
    trainer.fit()
    losses = [rec["total_loss"] for rec in _read_metrics(tmp_path)]
    return trainer, losses


def _read_metrics(path):
    from flashdino.engine.metrics import read_jsonl

    return read_jsonl(os.path.join(path, "metrics.jsonl"))


def _assert_same_state(a, b):
    for part in ("student", "teacher"):
        sa, sb = getattr(a.model, part).state_dict(), getattr(b.model, part).state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k} differs"
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in oa:
        for name in oa[k]:
            assert torch.equal(oa[k][name], ob[k][name])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_exact(tmp_path, num_workers):
    """6 steps straight == 3 steps + resume + 3 steps (weights, teacher, optimizer, losses).

    v2 masking, drop path and crops all draw random numbers; with 2 workers the crops come from
    worker processes. (The epoch boundary has its own test below.)
    """
    straight, losses_straight = _run(tmp_path / "straight", 6, num_workers)
    _run(tmp_path / "resumed", 3, num_workers)
    resumed, losses_resumed = _run(tmp_path / "resumed", 6, num_workers)
    assert resumed.state.step == 6
    assert losses_resumed == losses_straight  # bit-identical floats, 3 from each half
    _assert_same_state(straight, resumed)


def test_resume_across_epoch_boundary(tmp_path):
    cfg_extra = ["data.synthetic_size=16"]  # 4 batches per epoch
    a = Trainer(tiny_config(tmp_path / "a", "simdino_vits16", "train.max_steps=6", *cfg_extra))
    a.fit()
    Trainer(tiny_config(tmp_path / "b", "simdino_vits16", "train.max_steps=3", *cfg_extra)).fit()
    b = Trainer(tiny_config(tmp_path / "b", "simdino_vits16", "train.max_steps=6", *cfg_extra))
    b.fit()
    assert (b.state.epoch, b.state.batch_in_epoch) == (1, 2)
    _assert_same_state(a, b)


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_nan_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "simdino_vits16", "train.max_steps=8", "train.checkpoint_every=2")
    trainer = Trainer(cfg)
    from flashdino.engine import meta_arch

    real = meta_arch.SSLMetaArch._simdino

    def poisoned(self, batch):
        out = real(self, batch)
        if trainer.state.step == 3:  # the 4th step (index 3) produces a NaN coding-rate term
            out["expa_loss"] = out["expa_loss"] * float("nan")
            out["total_loss"] = out["total_loss"] + out["expa_loss"]
        return out

    monkeypatch.setattr(meta_arch.SSLMetaArch, "_simdino", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    assert err.value.step == 3 and err.value.terms[0] == "expa_loss"
    assert "step 3" in str(err.value) and "expa_loss" in str(err.value)
    latest = ckpt.find_latest(str(tmp_path))
    state = ckpt.load_checkpoint(latest)
    assert state["train_state"]["step"] == 2  # the last good checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_a_nan_gradient_under_a_finite_loss_stops_before_its_checkpoint(tmp_path):
    # Step index 3 is followed by a checkpoint (checkpoint_every=2): its weights, updated with a NaN
    # gradient, must not be written, though its loss (computed before the update) is finite.
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=8", "train.checkpoint_every=2"))
    head_weight = next(trainer.model.student["head"].parameters())
    head_weight.register_hook(lambda g: g * float("nan") if trainer.state.step == 3 else g)
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    assert err.value.step == 3 and err.value.terms == ["grad_norm_head"]
    assert "loss or gradient at step 3: grad_norm_head=nan" in str(err.value)
    state = ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))
    assert state["train_state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_world_size_mismatch_on_resume_is_refused(tmp_path):
    Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=1")).fit()
    state = ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))
    state["world_size"] = 8
    ckpt.atomic_save(state, os.path.join(tmp_path, "checkpoint.pth"))
    with pytest.raises(ckpt.CheckpointError, match="world size 8"):
        Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=2"))


def test_sigkill_at_any_moment_then_resume_matches_straight_run(tmp_path):
    """A real process killed with SIGKILL (mid-step or mid-checkpoint) resumes from the last complete
    checkpoint, and the finished run equals an uninterrupted one."""
    import signal
    import subprocess
    import sys
    import time

    args = [a for a in TINY] + ["train.precision=fp32", "train.checkpoint_every=1", "train.max_steps=30"]
    straight = Trainer(build_config("simdino_vits16", overrides=args + [f"train.output_dir={tmp_path / 'straight'}"]))
    straight.fit()

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flashdino.engine.cli", "train", "--preset", "simdino_vits16",
           "--output-dir", str(out)] + args
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pth").exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.find_latest(str(out)), "no checkpoint was written before the kill"
    killed_state = ckpt.load_checkpoint(ckpt.find_latest(str(out)))["train_state"]
    killed_at = killed_state["step"]
    assert killed_at < 24, "the run finished before it could be killed"
    resumed = Trainer(build_config("simdino_vits16", overrides=args + [f"train.output_dir={out}"]))
    assert resumed.state.step == killed_at
    assert not [f for f in os.listdir(out) if ".tmp." in f], "temp files of the killed write were left behind"
    resumed.fit()
    assert resumed.state.step == straight.state.step == 24
    try:
        _assert_same_state(straight, resumed)
    except AssertionError as exc:
        raise AssertionError(f"after a kill at {killed_state}: {exc}") from None
    # The metrics hold each step once, as the straight run logged it: what the killed run logged past
    # its checkpoint (a line cut mid-write included) went to the ".superseded" file.
    expected = [(r["step"], r["total_loss"]) for r in _read_metrics(tmp_path / "straight")]
    assert [(r["step"], r["total_loss"]) for r in _read_metrics(out)] == expected


def test_more_iterations_per_epoch_than_the_data_holds_is_a_config_error(tmp_path, capsys):
    from flashdino.engine.cli import main as cli_main

    code = cli_main(["train", "--output-dir", str(tmp_path / "run"), "data.dataset=synthetic", "data.synthetic_size=16",
                     "data.batch_size=8", "optim.iters_per_epoch=3", "eval.after_train=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "optim.iters_per_epoch=3 exceeds the 2 batches" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")


def test_dali_device_id_of_a_bare_cuda_device_is_the_current_device(monkeypatch):
    from flashdino.engine.trainer import dali_device_id

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dali_device_id(torch.device("cpu")) is None
    assert dali_device_id(torch.device("cuda", 1)) == 1
    assert dali_device_id(torch.device("cuda")) == 3  # was None: DALI silently ran on the CPU


def test_an_fp32_checkpoint_resumes_in_fp16(tmp_path):
    # The fp32 run saves an empty scaler state, which GradScaler refuses to load; the fp16 resume
    # starts its loss scale afresh instead of crashing.
    Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=2", "train.checkpoint_every=2")).fit()
    resumed = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=3", "train.precision=fp16"))
    assert resumed.state.step == 2 and resumed.runtime.scaler.is_enabled()
    assert resumed.fit()["steps"] == 3


def test_max_minutes_stops_checkpoints_and_says_so(tmp_path):
    # One process checks its clock after every step (several ranks do at log steps, test_runtime_distributed).
    cfg = tiny_config(tmp_path, "simdino_vits16", "train.max_minutes=1e-9", "train.log_every=2")
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert summary["steps"] == 1 and summary["planned_steps"] == trainer.total_steps > 2
    assert summary["stopped_early"] == f"train.max_minutes=1e-09 reached at step 1 of {trainer.total_steps}"
    assert ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))["train_state"]["step"] == 1
    unlimited = Trainer(tiny_config(tmp_path / "full", "simdino_vits16", "train.max_steps=3")).fit()
    assert unlimited["stopped_early"] is None and unlimited["steps"] == 3
    # time running out on the last planned step: the schedule did finish, so it is no early stop
    last = Trainer(tiny_config(tmp_path / "last", "simdino_vits16", "train.max_steps=1", "train.max_minutes=1e-9")).fit()
    assert last["steps"] == 1 and last["stopped_early"] is None
    with pytest.raises(ConfigError, match="train.max_minutes must be >= 0"):
        Trainer(tiny_config(tmp_path / "bad", "simdino_vits16", "train.max_minutes=-1"))


def test_plots_without_an_evaluation_read_the_training_images(tmp_path):
    # No k-NN after training: the attention maps take their images from the training reader, which
    # the torchvision loader wraps (the plot failed with "MultiCropDataset has no attribute load").
    pytest.importorskip("matplotlib")
    cfg = tiny_config(tmp_path, "simdino_vits16", "train.max_steps=2", "log.plots=true", "eval.after_train=false")
    from flashdino.engine.eval.callbacks import build_callbacks

    summary = Trainer(cfg, build_callbacks(cfg)).fit()
    assert sorted(os.path.basename(p) for p in summary["plots"]) == ["attention_maps.png", "loss_curves.png"]


def _fake_clock(monkeypatch, trainer, seconds_per_step):
    """The trainer's clock advances only by `seconds_per_step` per training step."""
    import flashdino.engine.trainer as trainer_mod

    now = [1000.0]
    monkeypatch.setattr(trainer_mod, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: now[0])}))
    step = trainer.train_step

    def timed_step(batch):
        now[0] += seconds_per_step
        return step(batch)

    trainer.train_step = timed_step


def _cosine_v1(start, end, i, total):
    import math

    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * i / total))


def test_fit_to_time_shortens_the_schedule_to_whole_epochs_that_fit_and_finishes_it(tmp_path, monkeypatch):
    # 4 steps per epoch, 10 epochs planned (2 of warm-up); 1 s per step and a 30 s budget. The speed
    # is measured from the first log step (2) over windows spanning >= 3 s (a tenth): at step 6,
    # (30 * 0.95 - 6) s are left -> 22 more steps -> 28 steps = 7 whole epochs.
    extra = ("data.synthetic_size=16", "optim.epochs=10", "optim.warmup_epochs=2", "train.log_every=2",
             "train.max_minutes=0.5", "train.fit_to_time=true")
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", *extra))
    assert trainer.total_steps == 40
    _fake_clock(monkeypatch, trainer, 1.0)
    summary = trainer.fit()
    assert summary["steps"] == summary["planned_steps"] == 28 and summary["stopped_early"] is None
    fit = summary["schedule_fit"]
    assert (fit["planned_epochs"], fit["fitted_epochs"], fit["at_step"], fit["seconds_per_step"]) == (10, 7, 6, 1.0)
    # The LR warm-up (steps 0-7) is the same in both schedules; weight decay is a cosine from step 0.
    assert fit["max_change_of_past_values"]["lr"] == 0.0
    o = trainer.cfg.optim
    want_wd = max(abs(_cosine_v1(o.weight_decay, o.weight_decay_end, i, 40) - _cosine_v1(o.weight_decay, o.weight_decay_end, i, 28))
                  for i in range(6))
    assert fit["max_change_of_past_values"]["wd"] == pytest.approx(want_wd, rel=1e-9) and want_wd > 0
    # The schedule really ended: the last step ran at the end of the new cosine (warm-up 8 of 28
    # steps), not mid-way through the planned one.
    peak = trainer.schedules.lr.peak
    assert trainer.schedules.values(27)["lr"] == pytest.approx(_cosine_v1(peak, o.min_lr, 27 - 8, 28 - 8), rel=1e-9)
    assert trainer.schedules.values(27)["lr"] < 1.1 * o.min_lr
    assert "epochs: 7" in (tmp_path / "config.yaml").read_text()
    # A resumed run keeps the fitted schedule (its own config still says 10 epochs).
    resumed = Trainer(tiny_config(tmp_path, "simdino_vits16", *extra))
    assert resumed.state.step == 28 and resumed.total_steps == 28 and resumed.schedule_fit == fit


def test_fit_to_time_measures_over_a_tenth_of_the_budget_not_one_window(tmp_path, monkeypatch):
    # 60 s budget -> the speed is measured over >= 6 s from the first log step (2). Step 3 takes 4 s
    # (a burst), every other step 1 s. At step 4 only 5 s are behind (too short); at step 6, 7 s over
    # 4 steps = 1.75 s/step, 9 s elapsed: (57 - 9) / 1.75 = 27.4 more steps -> 33 -> 8 epochs of 4.
    # (The window of steps 3-4 alone would have said 2.5 s/step and 6 epochs.)
    import flashdino.engine.trainer as trainer_mod

    extra = ("data.synthetic_size=16", "optim.epochs=50", "optim.warmup_epochs=2", "train.log_every=2",
             "train.max_minutes=1", "train.fit_to_time=true")
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", *extra))
    now, calls = [0.0], [0]
    monkeypatch.setattr(trainer_mod, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: now[0])}))
    step = trainer.train_step

    def bursty_step(batch):
        calls[0] += 1
        now[0] += 4.0 if calls[0] == 3 else 1.0
        return step(batch)

    trainer.train_step = bursty_step
    summary = trainer.fit()
    fit = summary["schedule_fit"]
    assert (fit["at_step"], fit["seconds_per_step"], fit["fitted_epochs"]) == (6, 1.75, 8)
    assert summary["steps"] == 32 and summary["stopped_early"] is None


def test_fit_to_time_keeps_a_schedule_that_fits_and_needs_max_minutes(tmp_path, monkeypatch):
    extra = ("data.synthetic_size=16", "optim.epochs=3", "train.log_every=2", "train.fit_to_time=true")
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", *extra, "train.max_minutes=0.5"))
    _fake_clock(monkeypatch, trainer, 1.0)
    summary = trainer.fit()
    assert summary["steps"] == 12 and summary["schedule_fit"]["fitted_epochs"] == 3
    assert summary["schedule_fit"]["max_change_of_past_values"] == {}
    with pytest.raises(ConfigError, match="train.fit_to_time=true fits the schedule to train.max_minutes"):
        Trainer(tiny_config(tmp_path / "bad", "simdino_vits16", *extra))


def test_fitted_epochs_by_hand():
    from flashdino.engine.time_budget import fitted_epochs

    common = dict(planned_epochs=30, warmup_epochs=3, iters_per_epoch=100, seconds_per_step=0.5)
    # 600 s * 0.95 = 570 s; 60 s used at step 100 -> 1020 more steps -> 1120 steps -> 11 epochs.
    assert fitted_epochs(step=100, elapsed_s=60.0, budget_s=600.0, **common) == 11
    assert fitted_epochs(step=100, elapsed_s=60.0, budget_s=1e6, **common) == 30  # never longer than planned
    assert fitted_epochs(step=100, elapsed_s=60.0, budget_s=30.0, **common) == 4  # warm-up + one epoch at least
    assert fitted_epochs(step=750, elapsed_s=60.0, budget_s=30.0, **common) == 8  # never behind the current epoch
    with pytest.raises(ValueError, match="seconds_per_step"):
        fitted_epochs(step=100, elapsed_s=60.0, budget_s=600.0, **dict(common, seconds_per_step=0.0))


@pytest.mark.parametrize("mode", ["per_param", "per_module"])
def test_gradient_norms_before_clipping_are_reported_in_both_clip_modes(tmp_path, mode):
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", f"optim.clip_mode={mode}", "optim.clip_grad=0.01"))
    batch = trainer.runtime.prepare_batch(trainer._to_device(next(iter(trainer.loader))))
    losses = trainer.forward(batch, teacher_temp=torch.tensor(0.04))
    trainer.runtime.backward(losses["total_loss"])
    grads = {part: [p.grad.double().clone() for p in trainer.model.student[part].parameters() if p.grad is not None]
             for part in ("backbone", "head")}
    norms = trainer.runtime.step()
    for part, tensors in grads.items():
        expected = sum(float((g ** 2).sum()) for g in tensors) ** 0.5
        assert float(norms[f"grad_norm_{part}"]) == pytest.approx(expected, rel=1e-5), part
        assert expected > 0.01  # so the clipping below had something to do
    clipped = [p.grad for p in trainer.model.student.parameters() if p.grad is not None]
    assert max(float(g.norm()) for g in clipped) <= 0.01 * (1 + 1e-4)

"""Eager EMA (spec 1.7), atomic checkpoints and the finite-loss guard."""
import os

import pytest
import torch
from torch import nn

from flashdino.engine import checkpoint as ckpt
from flashdino.engine.ema import EagerEMA, build_ema, paired_parameters
from flashdino.engine.finite_guard import FiniteGuard, NonFiniteLossError


def test_eager_ema_matches_float64_formula():
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 3), nn.Linear(5, 3)
    t0 = {k: v.double().clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.double().clone() for k, v in student.state_dict().items()}
    ema = build_ema("eager", teacher, student)
    m = 0.996
    ema.update(m)
    for k in t0:
        expected = m * t0[k] + (1 - m) * s0[k]
        assert torch.allclose(teacher.state_dict()[k].double(), expected, rtol=1e-6, atol=1e-7)


def test_ema_mixed_precision_copies():
    student, teacher = nn.Linear(4, 4), nn.Linear(4, 4).half()
    ema = EagerEMA(*paired_parameters(teacher, student))
    before = teacher.weight.detach().float().clone()
    ema.update(0.5)
    expected = (0.5 * before + 0.5 * student.weight.detach().float()).half().float()
    assert torch.allclose(teacher.weight.float(), expected, atol=1e-3)


def test_paired_parameters_rejects_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        paired_parameters(nn.Linear(3, 2), nn.Linear(3, 4))


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    ckpt.atomic_save({"step": 1, "w": torch.ones(3)}, path)
    before = open(path, "rb").read()

    real_save = torch.save

    def crashing_save(obj, fh, *a, **k):
        fh.write(b"partial bytes of a checkpoint")  # a half-written file, then the crash
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temp file left behind
    assert ckpt.load_checkpoint(path)["step"] == 1


def test_numbered_checkpoints_are_pruned(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_checkpoint(str(tmp_path), {"step": step}, step, keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint.pth", "checkpoint_step20.pth", "checkpoint_step30.pth"]
    assert ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))["step"] == 30


def test_a_copy_over_the_latest_checkpoint_leaves_the_numbered_ones_alone(tmp_path):
    # Rolling back by hand: `cp checkpoint_step10.pth checkpoint.pth` writes into checkpoint.pth's
    # file; were the numbered checkpoint of step 20 a hard link to it, it would become step 10 too.
    import shutil

    for step in (10, 20):
        ckpt.save_checkpoint(str(tmp_path), {"step": step, "w": torch.full((4,), float(step))}, step, keep=2)
    shutil.copyfile(tmp_path / "checkpoint_step10.pth", tmp_path / "checkpoint.pth")
    assert ckpt.load_checkpoint(str(tmp_path / "checkpoint.pth"))["step"] == 10
    assert ckpt.load_checkpoint(str(tmp_path / "checkpoint_step20.pth"))["step"] == 20


def test_a_full_disk_is_a_checkpoint_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    ckpt.save_checkpoint(str(tmp_path), {"step": 10}, 10, keep=1)
    real_save = torch.save

    def disk_full(obj, fh, *a, **k):
        fh.write(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="step-20 checkpoint in .*No space left on device.*intact"):
        ckpt.save_checkpoint(str(tmp_path), {"step": 20}, 20, keep=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint_step10.pth"]
    assert ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))["step"] == 10


def test_corrupt_checkpoint_error_names_file(tmp_path):
    bad = tmp_path / "checkpoint.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint.pth"):
        ckpt.load_checkpoint(str(bad))


def test_strip_prefixes():
    sd = {"module.backbone._orig_mod.cls_token": 1, "backbone.blocks.0._orig_mod.attn.qkv.weight": 2}
    assert ckpt.strip_prefixes(sd) == {"cls_token": 1, "blocks.0.attn.qkv.weight": 2}


def test_finite_guard_names_step_and_term():
    guard = FiniteGuard()
    guard.record(0, {"total_loss": torch.tensor(1.0), "expa_loss": torch.tensor(0.5)})
    guard.check()
    guard.record(1, {"total_loss": torch.tensor(float("nan")), "expa_loss": torch.tensor(float("inf"))})
    guard.record(2, {"total_loss": torch.tensor(float("nan")), "expa_loss": torch.tensor(0.1)})
    with pytest.raises(NonFiniteLossError) as err:
        guard.check()
    assert err.value.step == 1 and err.value.terms[0] == "expa_loss"
    assert "step 1" in str(err.value) and "expa_loss" in str(err.value)


def test_rng_state_round_trip_restores_every_generator():
    import random

    import numpy as np

    saved = ckpt.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()  # move all three on
    ckpt.set_rng_state(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_cuda_rng_states_restore_the_devices_this_machine_has(monkeypatch):
    # Saved with 4 visible GPUs, resumed where 2 are visible: the first two are restored, on the CPU
    # tensors the setter requires, and nothing raises.
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: calls.append((i, s.device.type, int(s[0]))))
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]}
    ckpt.set_rng_state(state)
    assert calls == [(0, "cpu", 0), (1, "cpu", 1)]


@pytest.mark.gpu
def test_resume_with_checkpoint_mapped_to_the_gpu(tmp_path):
    # The local runtime loads checkpoints with map_location=<its cuda device>.
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "c.pth")
    expected = torch.rand(4, device="cuda")
    state = ckpt.load_checkpoint(str(tmp_path / "c.pth"), map_location=torch.device("cuda", 0))
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.rand(4, device="cuda"), expected)

"""Resuming from an output_dir: a checkpoint of another model is refused with the settings that
differ (and left untouched); one written under other step-changing settings resumes with a warning
naming them; operational settings change silently."""
import pytest
import torch

from flashdino.engine import checkpoint as ckpt
from flashdino.engine.cli import main as cli_main
from flashdino.engine.config import build_config, to_dict
from flashdino.engine.meta_arch import SSLMetaArch
from flashdino.engine.resume_check import changed_settings_warning, shape_mismatches
from flashdino.engine.trainer import Trainer

from test_trainer import TINY, tiny_config


@pytest.fixture
def trained_dir(tmp_path):
    Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=2")).fit()
    return tmp_path


def test_a_checkpoint_of_another_model_is_refused_and_kept(trained_dir, capsys):
    path = ckpt.find_latest(str(trained_dir))
    before = open(path, "rb").read()
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(tiny_config(trained_dir, "simdino_vits16", "train.max_steps=4", "model.embed_dim=48"))
    message = str(info.value)
    assert "written for another model" in message and "(32,) in the checkpoint, (48,) in this run" in message
    assert "Settings that differ: model.embed_dim 32 -> 48." in message
    assert "train.resume=false" in message and "new train.output_dir" in message
    assert open(path, "rb").read() == before

    # the command says so in one message, without a traceback
    overrides = TINY + ["train.precision=fp32", "model.embed_dim=48", "train.max_steps=4", "eval.after_train=false"]
    assert cli_main(["train", "--preset", "simdino_vits16", "--output-dir", str(trained_dir), *overrides]) == 2
    err = capsys.readouterr().err
    assert "flashdino: error: the checkpoint" in err and "Traceback" not in err


def test_changed_step_settings_resume_with_a_warning_operational_ones_without(trained_dir, capsys):
    capsys.readouterr()
    quiet = Trainer(tiny_config(trained_dir, "simdino_vits16", "train.max_steps=3", "train.log_every=5",
                                "runtime.compile=none", "data.num_workers=1", "log.jsonl=false"))
    assert quiet.state.step == 2
    err = capsys.readouterr().err
    assert "resumed from" in err and "warning" not in err

    loud = Trainer(tiny_config(trained_dir, "simdino_vits16", "train.max_steps=3", "optim.base_lr=0.01",
                               "crops.n_local=4"))
    assert loud.state.step == 2
    err = capsys.readouterr().err
    assert "warning: resuming under settings that differ" in err
    assert "crops.n_local 2 -> 4" in err and "optim.base_lr 0.0005 -> 0.01" in err


def test_a_fitted_schedule_is_not_reported_as_a_change():
    cfg = build_config("simdino_vits16", overrides=TINY)
    saved = to_dict(cfg)
    saved["optim"]["epochs"] = 1  # what fit_to_time records after shortening the schedule
    state = {"config": saved, "schedule_fit": {"planned_epochs": 2, "fitted_epochs": 1}}
    assert changed_settings_warning(state, to_dict(cfg)) == ""
    state["schedule_fit"] = None
    assert "optim.epochs 1 -> 2" in changed_settings_warning(state, to_dict(cfg))


def test_missing_and_extra_weights_and_buffers_are_named():
    model = SSLMetaArch(build_config("dino_vits16", overrides=TINY + ["head.n_prototypes=64"]))
    state = {"student": dict(model.student.state_dict()), "teacher": model.teacher.state_dict(), "buffers": {}}
    del state["student"]["backbone.cls_token"]
    state["student"]["head.extra"] = torch.zeros(1)
    found = shape_mismatches(state, model, limit=10)
    assert found == ["student.backbone.cls_token: not in the checkpoint", "student.head.extra: only in the checkpoint",
                     "buffer center: not in the checkpoint"]
    assert shape_mismatches(state, model, limit=1) == ["student.backbone.cls_token: not in the checkpoint", "... 2 more"]


def test_starting_over_moves_the_previous_run_into_a_resumable_subfolder(trained_dir, capsys):
    from flashdino.engine.metrics import read_jsonl

    for attempt in (1, 2):
        capsys.readouterr()
        Trainer(tiny_config(trained_dir, "simdino_vits16", "train.max_steps=1", "train.resume=false")).fit()
        assert "train.resume=false: the run that was in" in capsys.readouterr().err
        assert ckpt.load_checkpoint(ckpt.find_latest(str(trained_dir)))["train_state"]["step"] == 1
        assert [r["step"] for r in read_jsonl(trained_dir / "metrics.jsonl")] == [1]
        previous = sorted(p for p in trained_dir.iterdir() if p.name.startswith(ckpt.PREVIOUS_RUN_PREFIX))
        assert len(previous) == attempt  # one more each time, side by side, none inside another
    first, second = previous
    assert [r["step"] for r in read_jsonl(first / "metrics.jsonl")] == [1, 2]
    assert (first / "config.yaml").exists() and not list(first.glob(ckpt.PREVIOUS_RUN_PREFIX + "*"))
    assert (trained_dir / ".flashdino.lock").exists() and not (first / ".flashdino.lock").exists()  # the lock stays
    assert ckpt.load_checkpoint(str(second / "checkpoint.pth"))["train_state"]["step"] == 1
    # a moved run is a run folder like any other: it resumes where it stopped
    assert Trainer(tiny_config(first, "simdino_vits16", "train.max_steps=3")).state.step == 2

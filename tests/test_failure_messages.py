"""An out-of-memory step stops training with the knobs that lower the peak, and loses nothing; a
Ctrl-C outside training ends the command with status 130, and an output folder that cannot be
written ends it with one line; no traceback either way."""
import pytest
import torch

from flashdino.engine import checkpoint as ckpt
from flashdino.engine.cli import main as cli_main
from flashdino.engine.config import build_config
from flashdino.engine.memory_advice import TrainingOutOfMemoryError, out_of_memory_advice
from flashdino.engine.trainer import Trainer

from test_trainer import tiny_config


def test_out_of_memory_step_names_the_knobs_and_keeps_the_last_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "simdino_vits16", "train.max_steps=6", "train.checkpoint_every=1"))
    step = trainer.train_step
    calls = []

    def step_that_runs_out(batch):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(batch)

    trainer.train_step = step_that_runs_out
    with pytest.raises(TrainingOutOfMemoryError) as info:
        trainer.fit()
    message = str(info.value)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert "training step 2 on cpu" in message and "intact" in message
    assert "data.batch_size=4 per rank now" in message
    assert "runtime.activation_checkpointing=1 (now 0 of the student's 2 blocks)" in message
    assert "train.precision=bf16" in message
    assert "zero_stage" not in message  # one process: nothing to shard over
    assert ckpt.load_checkpoint(ckpt.find_latest(str(tmp_path)))["train_state"]["step"] == 2


def test_advice_leaves_out_what_is_already_on():
    cfg = build_config("simdino_vitb16", overrides=["runtime.activation_checkpointing=12", "train.precision=bf16",
                                                    "runtime.distributed=ddp"])
    message = out_of_memory_advice(cfg, 7, torch.device("cpu"), depth=12, world_size=8)
    assert "data.batch_size=64 per rank now" in message
    assert "activation_checkpointing" not in message and "train.precision" not in message
    assert "over the 8 ranks: runtime.distributed=deepspeed runtime.zero_stage=2" in message
    cfg = build_config("simdino_vitb16", overrides=["runtime.activation_checkpointing=4",
                                                    "runtime.distributed=deepspeed", "runtime.zero_stage=3"])
    message = out_of_memory_advice(cfg, 7, torch.device("cpu"), depth=12, world_size=8)
    assert "runtime.activation_checkpointing=8 (now 4 of the student's 12 blocks)" in message
    assert "zero_stage" not in message


def test_ctrl_c_outside_training_ends_the_command_without_a_traceback(monkeypatch, capsys):
    import flashdino.engine.commands.config as config_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_command, "main", interrupted)
    assert cli_main(["config", "keys"]) == 130
    err = capsys.readouterr().err
    assert "flashdino: interrupted" in err and "Traceback" not in err


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    from test_trainer import TINY

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = cli_main(["train", "--preset", "simdino_vits16", "--output-dir", str(blocker / "run"), *TINY,
                     "train.precision=fp32", "train.max_steps=1", "eval.after_train=false"])
    err = capsys.readouterr().err
    assert code == 2 and "flashdino: error:" in err and "Not a directory" in err and "Traceback" not in err

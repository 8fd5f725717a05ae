"""The documented launch commands (docs/DISTRIBUTED.md) on one machine: torchrun as two "nodes" of
one process each meeting at a c10d rendezvous on 127.0.0.1 (the multi-node path), and the DeepSpeed
launcher. Both train with the real CLI on gloo, write a checkpoint and resume from it."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from flashdino.engine import checkpoint as ckpt

from _ranks import free_port

TINY = [
    "model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    "model.img_size=32", "head.hidden_dim=32", "head.bottleneck_dim=16", "crops.global_size=32",
    "crops.local_size=16", "crops.n_local=2", "data.dataset=synthetic", "data.synthetic_size=32",
    "data.batch_size=4", "data.num_workers=0", "optim.epochs=2", "optim.warmup_epochs=1", "log.tensorboard=false",
    "log.progress_bar=false", "log.plots=false", "train.checkpoint_every=0",
]
TRAIN = ["-m", "flashdino.engine.cli", "train", "--preset", "simdino_vits16"]



def _check(procs, timeout=300):
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outputs.append(out)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def _torchrun_two_nodes(out_dir, *overrides):
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=flashdino",
               *TRAIN, "--output-dir", str(out_dir), *TINY, *overrides]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    _check(procs)


def test_torchrun_multi_node_rendezvous_trains_and_resumes_with_zero2(tmp_path):
    out = tmp_path / "run"
    args = ("runtime.zero_stage=2", "train.precision=bf16")
    _torchrun_two_nodes(out, "train.max_steps=2", *args)
    state = ckpt.load_checkpoint(ckpt.find_latest(str(out)))
    assert state["world_size"] == 2 and state["runtime"] == "deepspeed" and state["train_state"]["step"] == 2
    assert os.path.isdir(out / "deepspeed" / state["shards"]["tag"])
    _torchrun_two_nodes(out, "train.max_steps=3", *args)
    state = ckpt.load_checkpoint(ckpt.find_latest(str(out)))
    assert state["train_state"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["teacher"].values())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed", path=os.path.dirname(sys.executable)) is None,
                    reason="the deepspeed launcher is not installed beside this Python")
def test_deepspeed_launcher_trains_with_zero3(tmp_path):
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    out = tmp_path / "run"
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()), "--module",
           *TRAIN[1:], "--output-dir", str(out), *TINY, "runtime.zero_stage=3", "train.precision=fp32",
           "train.max_steps=2"]
    # The launcher starts `python -m ...` with the interpreter first on PATH: make it this one.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    _check([subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)])
    state = ckpt.load_checkpoint(ckpt.find_latest(str(out)))
    assert state["world_size"] == 2 and state["shards"]["zero_stage"] == 3

"""Atomic checkpoints and the random-number state needed for an exact resume.

A checkpoint is written to a temporary file in the same directory, flushed and fsync'ed, then
renamed over the old one (rename is atomic on POSIX), and the directory is fsync'ed so the rename
itself survives a crash. A run killed at any moment therefore leaves either the previous complete
checkpoint or the new complete one, never a half-written file.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

LATEST = "checkpoint.pth"
PREVIOUS_RUN_PREFIX = "previous-run-"
_STEP_RE = re.compile(r"checkpoint_step(\d+)\.pth$")


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save `obj` to `path` atomically (temp file + fsync + rename + dir fsync)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Whatever happened (an exception, KeyboardInterrupt), the old checkpoint stays untouched.
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def rng_state() -> Dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    # .cpu(): a checkpoint loaded with map_location=<cuda device> brings the RNG byte tensors to the
    # GPU, and both torch setters accept only CPU tensors.
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # Saved on a machine with more visible GPUs than this one: restore the devices both have.
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), index)


def save_checkpoint(output_dir: str, state: Dict[str, Any], step: int, keep: int = 1) -> str:
    """Write `checkpoint.pth` (the latest) and, with keep > 0, a step-numbered copy; prune old copies.

    The numbered copy is a file of its own, not a hard link to `checkpoint.pth`: a user rolling back
    with `cp checkpoint_step<N>.pth checkpoint.pth` writes into the latest file, and would overwrite
    a linked numbered checkpoint with it."""
    latest = os.path.join(output_dir, LATEST)
    try:
        atomic_save(state, latest)
        if keep > 0:
            numbered = os.path.join(output_dir, f"checkpoint_step{step}.pth")
            atomic_save(state, numbered)
            for _, path in step_checkpoints(output_dir)[:-keep]:
                os.unlink(path)
    except OSError as exc:  # a full disk, a lost mount, no permission: say where, and what is left
        raise CheckpointError(f"could not write the step-{step} checkpoint in '{output_dir}': {exc}. Whatever "
                              f"checkpoint was there before is intact; fix the cause and resume.") from exc
    return latest


def step_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of the step-numbered checkpoints in `output_dir`, by step."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint_step*.pth")):
        match = _STEP_RE.search(path)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_stale_temp_files(output_dir: str) -> List[str]:
    """Delete temp files a killed run left behind mid-write (they are never read)."""
    stale = glob.glob(os.path.join(output_dir, "*.pth.tmp.*"))
    for path in stale:
        os.unlink(path)
    return stale


def move_previous_run(output_dir: str) -> Optional[str]:
    """Make room for a run that starts over in `output_dir` (train.resume=false) without losing the one
    there: when the folder holds a checkpoint, everything in it (checkpoints, DeepSpeed shards,
    metrics, TensorBoard, config, plots), earlier previous-run folders and hidden files aside, moves to
    `output_dir/previous-run-<UTC time>/`, itself a run folder that can be resumed or evaluated.
    Otherwise the new run's files would mix with the old ones (and pruning would keep the old run's
    higher-numbered checkpoints over the new run's). Returns that folder, or None when nothing moved."""
    if not os.path.isfile(os.path.join(output_dir, LATEST)):
        return None
    base = os.path.join(output_dir, PREVIOUS_RUN_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    target, n = base, 1
    while os.path.exists(target):
        target, n = f"{base}-{n}", n + 1
    os.makedirs(target)
    for name in sorted(os.listdir(output_dir)):
        # hidden files stay: the folder's own lock (engine/run_lock.py), held by the run now starting
        if not name.startswith((PREVIOUS_RUN_PREFIX, ".")):
            os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    _fsync_dir(output_dir)
    return target


def find_latest(output_dir: str) -> Optional[str]:
    path = os.path.join(output_dir, LATEST)
    return path if os.path.isfile(path) else None


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    try:
        # Our own checkpoints hold numpy / python RNG state, which weights_only loading rejects.
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a corrupt file should say which file
        raise CheckpointError(f"could not read checkpoint '{path}': {exc}") from exc


def strip_prefixes(state_dict: Dict[str, torch.Tensor], prefixes=("_orig_mod.", "module.", "backbone.")) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes (torch.compile, DDP, meta-arch) from every key (spec section 5)."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
            key = key.replace("._orig_mod.", ".")
        out[key] = value
    return out


def load_teacher_backbone(path: str) -> Dict[str, torch.Tensor]:
    """The teacher backbone's state dict from a training checkpoint (what evaluation uses)."""
    ckpt = load_checkpoint(path)
    if "teacher" not in ckpt:
        raise CheckpointError(f"checkpoint '{path}' has no 'teacher' entry (keys: {', '.join(ckpt)})")
    teacher = ckpt["teacher"]
    backbone = {k: v for k, v in teacher.items() if k.startswith("backbone.") or ".backbone." in k}
    return strip_prefixes(backbone if backbone else teacher)

"""Before a run resumes from its output_dir: does the checkpoint there fit this run's model, and which
settings differ from the run that wrote it?

A checkpoint of another model (another preset or width in a reused output_dir) is refused with the
settings that differ, instead of PyTorch's wall of size mismatches. A checkpoint that fits but was
written under other settings that change what a step computes (learning rate, batch size, crops, ...)
resumes under the new ones, with a warning naming each: changing them mid-run is sometimes meant,
and never silent. Settings of how a run executes or reports (compile, kernels, workers, logging,
limits) change on resume without comment.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch

from .checkpoint import CheckpointError
from .config import config_differences

# Prefixes of the settings that say how a run executes or reports, not what its steps compute.
OPERATIONAL_KEYS = (
    "preset",  # a label: the values it set are compared one by one
    "train.output_dir", "train.resume", "train.max_steps", "train.max_minutes", "train.fit_to_time",
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.device",
    "train.handle_signals", "train.deterministic", "log.", "eval.", "data.num_workers", "data.pipeline",
    "runtime.",  # compile, attention and Triton kernels compute the same steps; the runtime itself is checked apart
)


def setting_changes(saved_config: Mapping[str, Any], config: Mapping[str, Any],
                    ignore: tuple = ()) -> Dict[str, List[Any]]:
    """{key: [checkpoint's value, this run's value]} for the settings that change what a step computes."""
    return {k: v for k, v in config_differences(saved_config, config).items()
            if not k.startswith(OPERATIONAL_KEYS + tuple(ignore))}


def _full_shapes(module: torch.nn.Module) -> Dict[str, tuple]:
    """Shape of each state-dict entry; a ZeRO-3 partitioned parameter (empty here) by its full shape."""
    params = dict(module.named_parameters())
    return {name: tuple(getattr(params.get(name), "ds_shape", None) or tensor.shape)
            for name, tensor in module.state_dict().items()}


def shape_mismatches(state: Mapping[str, Any], model: torch.nn.Module, limit: int = 3) -> List[str]:
    """How the checkpoint's student / teacher weights and buffers differ in names or shapes from `model`'s."""
    found: List[str] = []
    for part in ("student", "teacher"):
        mine = _full_shapes(getattr(model, part))
        theirs = state.get(part, {})
        for name in sorted(set(mine) | set(theirs)):
            if name not in theirs:
                found.append(f"{part}.{name}: not in the checkpoint")
            elif name not in mine:
                found.append(f"{part}.{name}: only in the checkpoint")
            elif tuple(theirs[name].shape) != mine[name]:
                found.append(f"{part}.{name}: {tuple(theirs[name].shape)} in the checkpoint, {mine[name]} in this run")
    buffers = {k for k, _ in model.named_buffers() if not k.startswith(("student.", "teacher."))}
    for name in sorted(buffers ^ set(state.get("buffers", {}))):
        found.append(f"buffer {name}: " + ("not in the checkpoint" if name in buffers else "only in the checkpoint"))
    return found[:limit] + ([f"... {len(found) - limit} more"] if len(found) > limit else [])


def _describe(changes: Dict[str, List[Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_checkpoint_fits(path: str, state: Mapping[str, Any], model: torch.nn.Module,
                          config: Mapping[str, Any]) -> None:
    """Raise CheckpointError when the checkpoint's weights do not fit `model`, naming the differing settings."""
    mismatches = shape_mismatches(state, model)
    if not mismatches:
        return
    changes = setting_changes(state["config"], config) if state.get("config") else {}
    settings = f" Settings that differ: {_describe(changes)}." if changes else ""
    raise CheckpointError(
        f"the checkpoint '{path}' in train.output_dir was written for another model: {'; '.join(mismatches)}."
        f"{settings} Use a new train.output_dir, or train.resume=false to start over in this one "
        f"(the run there then moves to a previous-run-<time> subfolder)."
    )


def changed_settings_warning(state: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """The warning for a resume under settings that differ from the checkpoint's, or "" when none do."""
    # A run fitted to its time budget recorded its shortened epochs; the resumed run restores them.
    ignore = ("optim.epochs",) if state.get("schedule_fit") else ()
    changes = setting_changes(state["config"], config, ignore) if state.get("config") else {}
    if not changes:
        return ""
    return (f"[flashdino] warning: resuming under settings that differ from the checkpoint's; the remaining "
            f"steps use this run's values: {_describe(changes)}")

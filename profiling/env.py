"""What a result was measured on: device, driver, library versions, git commit, the exact command.

Every JSON the harnesses write carries this block, so a number is never separated from the
machine and the code that produced it.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from typing import Dict, List, Optional

import torch

_LIBRARIES = ("torch", "triton", "numpy", "torchvision", "deepspeed", "nvtx", "timm", "flash-attn", "flashdino")
_DALI_PREFIX = "nvidia-dali"  # the package name carries the CUDA major version: nvidia-dali-cuda120, -cuda130
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def library_versions() -> Dict[str, Optional[str]]:
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    dali = sorted((d.metadata["Name"], d.version) for d in importlib.metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith(_DALI_PREFIX))
    out[dali[0][0] if dali else _DALI_PREFIX] = dali[0][1] if dali else None
    out["torch"] = torch.__version__  # carries the build tag (+cu130), the package metadata does not
    out["cuda_runtime"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


def _run(cmd: List[str], cwd: Optional[str] = None) -> Optional[str]:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info(root: str = _REPO_ROOT) -> Dict[str, object]:
    """Commit of the checkout the code was imported from, and whether it had uncommitted changes."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=root)
    if commit is None:
        # A copy without .git (the GPU machine gets the working tree only): the commit recorded when
        # the copy was made (scripts/gpu_prepare.sh writes .gpu/commit as "<sha> [dirty]").
        recorded = _recorded_commit(root)
        if recorded:
            return recorded
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root) if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _recorded_commit(root: str) -> Optional[Dict[str, object]]:
    path = os.path.join(root, ".gpu", "commit")
    try:
        with open(path) as fh:
            words = fh.read().split()
    except OSError:
        return None
    if not words:
        return None
    info = {"commit": words[0], "dirty": "dirty" in words[1:], "source": path}
    # The record is only as fresh as the last gpu_prepare: the manifest beside it (`git ls-files -s`
    # then) shows whether the code here still is that commit's.
    changed = files_changed_since_manifest(root, os.path.join(root, ".gpu", "manifest"))
    if changed is not None:
        info["files_changed_since_commit"] = changed
        info["dirty"] = info["dirty"] or bool(changed)
    return info


def _git_blob_sha1(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def files_changed_since_manifest(root: str, manifest: str) -> Optional[List[str]]:
    """Files listed in a ``git ls-files -s`` manifest whose content here differs (or is gone);
    None without a manifest. Results folders are outputs, not code: a result committed after the
    manifest was written does not count."""
    try:
        with open(manifest) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    changed = []
    for line in lines:
        meta, _, name = line.partition("\t")
        parts = meta.split()
        if len(parts) != 3 or name.startswith("profiling/results/") or parts[0] == "160000":  # submodules
            continue
        if _git_blob_sha1(os.path.join(root, name)) != parts[1]:
            changed.append(name)
    return changed


def device_info(device: torch.device) -> Dict[str, object]:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"])
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "multiprocessors": props.multi_processor_count,
            "driver": driver,
            "count": torch.cuda.device_count(),
        }
    return {
        "type": device.type,
        "name": f"CPU ({platform.processor() or platform.machine()})",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "driver": None,
    }


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def command_line(prog_args: Optional[List[str]] = None) -> str:
    """The exact command that was run (``prog_args`` when given, else this process's argv)."""
    args = prog_args if prog_args is not None else [sys.executable] + sys.argv
    return " ".join(shlex.quote(str(a)) for a in args)


def cli_command(subcommand: str, args) -> str:
    """The `flashdino <subcommand> ...` command of a parsed CLI call.

    When this process was started as ``flashdino`` (or ``python -m flashdino.engine.cli``) that is
    its argv; when the CLI was called from Python (tests, notebooks) an equivalent command is
    rebuilt from the parsed arguments, defaults included.
    """
    argv = sys.argv
    if argv and os.path.basename(argv[0]) in ("flashdino", "cli.py") and subcommand in argv[1:]:
        return command_line(["flashdino"] + argv[1:])
    parts = ["flashdino"] + subcommand.split()
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key == "command" or key.endswith("_command") or key == "overrides":
            continue
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    parts += list(getattr(args, "overrides", None) or [])
    return command_line(parts)


def run_metadata(device: torch.device, command: Optional[str] = None) -> Dict[str, object]:
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "versions": library_versions(),
        "git": git_info(),
        "command": command or command_line(),
        "host": platform.node(),
        "platform": platform.platform(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "environment": recorded_environment(),
    }


# Variables that change what runs or how it compiles (FLASHDINO_COMPILE_BACKEND overrides the
# config's compile backend): a result must say which were set.
_RECORDED_ENV_PREFIXES = ("FLASHDINO_", "TORCHINDUCTOR_", "TORCHDYNAMO_", "TORCH_COMPILE", "TRITON_")
_RECORDED_ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_TF32_OVERRIDE", "OMP_NUM_THREADS")


def recorded_environment() -> Dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith(_RECORDED_ENV_PREFIXES) or k in _RECORDED_ENV_NAMES}


def describe(meta: Dict[str, object]) -> List[str]:
    """Markdown bullet lines for a metadata block."""
    dev = meta["device"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    git = meta["git"]
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    changed = git.get("files_changed_since_commit")
    if changed:
        commit += f": {len(changed)} file(s) differ from it ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})"
    lines = [
        f"- date: {meta['date']}",
        f"- device: {dev['name']}" + (f", driver {dev['driver']}" if dev.get("driver") else "")
        + (f", {dev['memory_gib']} GiB" if dev.get("memory_gib") else "")
        + (f", {dev['threads']} threads" if dev.get("threads") else ""),
        f"- versions: {versions}",
        f"- git commit: {commit}",
        f"- command: `{meta['command']}`",
    ]
    if meta.get("environment"):
        lines.append("- environment: " + ", ".join(f"`{k}={v}`" for k, v in meta["environment"].items()))
    return lines

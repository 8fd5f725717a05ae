"""Find and load the native DALI operator plugin (``libflashdino_dali.so``), once per process.

Search order: ``$FLASHDINO_DALI_PLUGIN``, the package folder ``pipelines/native/`` (where an installed
build puts it), ``<repo>/build/native/`` (``python -m flashdino.pipelines.native.build``), ``<repo>/build/``.
Without a usable plugin the pipeline uses DALI's built-in op chain and :func:`load_plugin` logs one
warning saying so (and why).
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

log = logging.getLogger(__name__)

PLUGIN_ENV = "FLASHDINO_DALI_PLUGIN"
PLUGIN_NAME = "libflashdino_dali.so"
OP_NAME = "FlashdinoColorAugment"
_HERE = os.path.dirname(os.path.realpath(__file__))
_NATIVE = os.path.join(os.path.dirname(_HERE), "native")
_REPO = os.path.dirname(os.path.dirname(_HERE))

FALLBACK_NOTE = (
    "using DALI's built-in op chain instead (approximate colour jitter, not the spec's: fixed "
    "brightness/contrast/saturation/hue order, contrast around mid-gray instead of the image mean, a YIQ "
    "hue rotation that turns less than torchvision's HSV shift); `python -m flashdino.pipelines.native.build` "
    "or scripts/setup.sh builds the plugin"
)

_state = {"path": None, "tried": False, "warned": False, "reason": None}


def candidates() -> List[str]:
    env = os.environ.get(PLUGIN_ENV)
    paths = [env] if env else []
    paths += [
        os.path.join(_NATIVE, PLUGIN_NAME),
        os.path.join(_REPO, "build", "native", PLUGIN_NAME),
        os.path.join(_REPO, "build", PLUGIN_NAME),
    ]
    return paths


def load_plugin(path: Optional[str] = None, warn: bool = True) -> Optional[str]:
    """Load the plugin (explicit `path`, else the first candidate that exists); its path or None.

    Loading happens once per process; later calls return the cached result. When nothing is
    loaded, one warning is logged (``warn=False`` suppresses it, e.g. for a status query).
    """
    if _state["path"] is not None:
        return _state["path"]
    if path is None and _state["tried"]:
        _warn_once(warn)
        return None
    _state["tried"] = True
    import nvidia.dali.plugin_manager as plugin_manager

    search = [path] if path else candidates()
    found = [p for p in search if p and os.path.isfile(p)]
    if not found:
        _state["reason"] = f"no {PLUGIN_NAME} found (looked in: {', '.join(p for p in search if p)}; build it with `python -m flashdino.pipelines.native.build`)"
    for p in found:
        try:
            plugin_manager.load_library(p)
        except Exception as exc:  # a stale or foreign build: say why, try the next one
            _state["reason"] = f"{p} failed to load: {exc}".splitlines()[0]
            continue
        _state["path"] = p
        _state["reason"] = None
        log.info("flashdino: loaded DALI plugin %s", p)
        return p
    _warn_once(warn)
    return None


def _warn_once(warn: bool) -> None:
    if warn and not _state["warned"]:
        _state["warned"] = True
        log.warning("flashdino DALI pipeline: native plugin unavailable: %s; %s", _state["reason"], FALLBACK_NOTE)


def unavailable_reason() -> Optional[str]:
    return _state["reason"]


def has_backend(device: str) -> bool:
    """Whether the loaded plugin has a kernel for `device` ('cpu' or 'gpu')."""
    if _state["path"] is None:
        return False
    from nvidia.dali.ops import _registry

    ops = _registry.gpu_ops() if device == "gpu" else _registry.cpu_ops()
    return OP_NAME in ops

"""Named presets: YAML files in ``engine/presets/`` holding the paper recipes and the demo.

A preset may name a base preset (``preset: other``) and override some of its keys.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import yaml

PRESET_DIR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "presets")


def list_presets() -> List[str]:
    return sorted(f[: -len(".yaml")] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def get_preset(name: str, _seen: tuple = ()) -> Dict[str, Any]:
    from .config import ConfigError

    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"unknown preset '{name}'; valid presets: {', '.join(list_presets())}")
    if name in _seen:
        raise ConfigError(f"preset '{name}' includes itself through {' -> '.join(_seen)}")
    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    base = values.pop("preset", None)
    return _merge(get_preset(base, _seen + (name,)), values) if base else values

"""Typed run configuration: defaults, presets, config files and ``key=value`` overrides.

One nested dataclass tree describes a run. Everything that reaches it (a preset, a YAML/JSON
file, command-line overrides) goes through :func:`apply_overrides`, which checks every key and
every value's type *before* any work starts, and names the valid choices when a key is wrong.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid. The message names the key and the valid choices."""


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------

METHODS = ("simdino", "simdinov2", "dino", "dinov2")
ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large")


@dataclass
class ModelConfig:
    arch: str = field(default="vit_small", metadata={"choices": ARCHS})
    patch_size: int = 16
    # "v1" = DINO-style ViT (SimDINO, DINO); "v2" = DINOv2-style (registers, layerscale, mask token).
    style: str = field(default="v1", metadata={"choices": ("v1", "v2")})
    img_size: int = 224  # size the learned position embedding is defined for
    in_chans: int = 3
    drop_path_rate: float = 0.1
    drop_path_uniform: bool = False  # v2: same rate in every block; v1: linear 0 -> rate
    layerscale: float = 0.0  # 0 disables layerscale; v2 uses 0.1 (SimDINOv2) / 1e-5 (DINOv2)
    num_register_tokens: int = 0
    # Width overrides for custom / demo models; 0 keeps the arch's value.
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    mlp_ratio: float = 4.0


@dataclass
class HeadConfig:
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    n_prototypes: int = 65536  # DINO / DINOv2 prototype layer only
    norm_last_layer: bool = True  # DINO: prototype norm g frozen at 1; DINOv2: trainable g


@dataclass
class ObjectiveConfig:
    method: str = field(default="simdino", metadata={"choices": METHODS})
    # SimDINO coding rate (spec section 2.4)
    eps: float = 0.05
    coeff: float = 1.0
    expa_type: int = field(default=1, metadata={"choices": (0, 1)})
    reduce_cov: bool = False
    # "Virtual ranks" (spec trap T4): split each rank's batch into this many groups and compute the
    # expansion term per group with the alpha/gamma of world_size * virtual_ranks ranks, so one GPU
    # at batch N*B reproduces N GPUs at batch B. 1 disables.
    virtual_ranks: int = 1
    # DINO / DINOv2 (spec section 4)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    center_momentum: float = 0.9
    centering: str = field(default="centering", metadata={"choices": ("centering", "sinkhorn_knopp", "none")})
    koleo_weight: float = 0.0
    # Loss weights of the image-level and patch-level terms (SimDINOv2 / DINOv2)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    # iBOT masking (spec section 3.2)
    mask_sample_probability: float = 0.5
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    freeze_last_layer_epochs: int = 1


@dataclass
class CropConfig:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: Tuple[float, float] = (0.4, 1.0)
    local_scale: Tuple[float, float] = (0.05, 0.4)
    # "pil" = v1 PIL GaussianBlur(radius); "torchvision" = v2 9x9 kernel with sigma (spec 1.1);
    # "auto" = the tree of model.style, set when the config is built (a saved config shows which).
    blur: str = field(default="auto", metadata={"choices": ("auto", "pil", "torchvision")})
    # Blur sigma (PIL radius) range, in output pixels, shared by all views. The recipe's (0.1, 2.0)
    # was chosen for 224/96-px crops; low-resolution datasets may want it scaled with the crop size.
    # (One probe on the demo, 28/224 of the range, gave no k-NN gain, so the demo keeps the recipe's.)
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    # Per-channel statistics for Normalize; ImageNet by default.
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    # None: the embedded default (Fashion-MNIST from the Debian package dataset-fashion-mnist).
    path: Optional[str] = None
    dataset: str = field(
        default="auto", metadata={"choices": ("auto", "imagefolder", "folder", "filelist", "fashion_mnist", "synthetic")}
    )
    pipeline: str = field(default="torchvision", metadata={"choices": ("torchvision", "dali")})
    batch_size: int = 64  # images per rank per step
    num_workers: int = 4
    synthetic_size: int = 256  # images in the "synthetic" dataset (tests, benchmarks)


@dataclass
class OptimConfig:
    epochs: int = 100
    warmup_epochs: int = 10
    base_lr: float = 0.0005
    # "linear_wrt_256": lr = base_lr * N*B/256 (v1). "sqrt_wrt_1024": base_lr * sqrt(N*B/1024) (v2).
    lr_scaling: str = field(default="linear_wrt_256", metadata={"choices": ("linear_wrt_256", "sqrt_wrt_1024", "none")})
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip_grad: float = 3.0  # 0 disables clipping (the optimizer still steps)
    # "per_param": each tensor clipped on its own (v1). "per_module": global norm per sub-module (v2).
    clip_mode: str = field(default="per_param", metadata={"choices": ("per_param", "per_module")})
    layerwise_decay: float = 1.0
    patch_embed_lr_mult: float = 1.0
    # "v1": linspace warmup including the endpoint; "v2": endpoint excluded, starts from min_lr.
    schedule_style: str = field(default="v1", metadata={"choices": ("v1", "v2")})
    # Iterations per epoch; 0 derives it from the dataset size.
    iters_per_epoch: int = 0
    # v2 parameter groups (weight decay exclusions by name, layer-wise decay)
    param_groups: str = field(default="v1", metadata={"choices": ("v1", "v2")})


@dataclass
class TeacherConfig:
    momentum: float = 0.996
    momentum_end: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/flashdino"
    seed: int = 0
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "fp16", "bf16")})
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_steps: int = 0  # stop after this many steps (0: run the full schedule)
    # Wall-clock budget of the training loop in minutes (0: none): checked after every step by one
    # process, at log steps (rank 0's clock) by several ranks; when spent, the run stops there,
    # checkpoints, evaluates and reports how far it got (a fixed time slot).
    max_minutes: float = 0.0
    # With max_minutes: after the compile warm-up, measure the speed over one log window and shorten
    # the schedule to the whole epochs that fit the budget (never lengthen it), so the run finishes
    # its schedule instead of being cut mid-way (engine/time_budget.py).
    fit_to_time: bool = False
    log_every: int = 10
    checkpoint_every: int = 500  # steps between checkpoints (also written at every epoch end)
    keep_checkpoints: int = 1  # extra step-numbered checkpoints kept beside checkpoint.pth
    resume: bool = True  # resume from output_dir/checkpoint.pth when it exists
    # SIGTERM / SIGINT / SIGUSR1 stop the run at the next step with a checkpoint (engine/stop_signals.py);
    # false leaves the process's signal handling alone (a host application that handles them itself).
    handle_signals: bool = True
    deterministic: bool = False


@dataclass
class KernelConfig:
    # "auto": the Triton kernel on a GPU, the eager reference on a CPU (engine/runtime/auto.py)
    ema: str = field(default="auto", metadata={"choices": ("auto", "eager", "triton")})
    centering: str = field(default="auto", metadata={"choices": ("auto", "eager", "triton")})
    coding_rate: str = field(default="auto", metadata={"choices": ("auto", "eager", "triton")})
    # "fused_adamw_ema": AdamW of the student and the teacher EMA in one Triton pass (kernels.FusedAdamWEMA).
    # In fp16 the GradScaler decides on the host whether to skip its step (one sync per step).
    optimizer: str = field(default="torch", metadata={"choices": ("torch", "fused_adamw_ema")})


@dataclass
class RuntimeConfig:
    attention: str = field(default="sdpa", metadata={"choices": ("sdpa", "flash", "cudnn", "math", "flash_attn")})
    # "none": eager; "block": per-block (regional) torch.compile; "full": the whole step;
    # "auto": block on a GPU, none on a CPU (engine/runtime/auto.py)
    compile: str = field(default="auto", metadata={"choices": ("auto", "none", "block", "full")})
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: graph capture without codegen)
    cuda_graphs: bool = False
    # Student multi-crop execution: "grouped" = one backbone call per crop resolution; "packed" =
    # one call over both groups, the token-wise layers (norms, qkv, proj, MLP) on all tokens at
    # once and attention per group (DINOv3-style; fewer, larger kernels). Same math either way.
    multicrop: str = field(default="grouped", metadata={"choices": ("grouped", "packed")})
    kernels: KernelConfig = field(default_factory=KernelConfig)
    distributed: str = field(default="auto", metadata={"choices": ("auto", "none", "ddp", "deepspeed")})
    zero_stage: int = field(default=0, metadata={"choices": (0, 1, 2, 3)})
    # Student blocks, from the first, whose activations are recomputed in the backward instead of
    # kept (torch.utils.checkpoint, non-reentrant): less activation memory, for a larger batch or
    # model, at about a third more compute in those blocks. 0: none; the model's depth: all.
    activation_checkpointing: int = 0


@dataclass
class LogConfig:
    tensorboard: bool = True
    jsonl: bool = True
    progress_bar: bool = True
    plots: bool = True  # loss curves and attention maps at the end of a run
    collapse_check: bool = True


@dataclass
class EvalConfig:
    # k-NN after training (the embedded default does this); 0 disables.
    knn_k: int = 20
    knn_temperature: float = 0.07
    after_train: bool = False
    eval_size: int = 224  # eval resize/crop; the demo uses its own small size
    resize_size: int = 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: str = ""  # name of the preset this config started from (informational)

    def to_dict(self) -> Dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------


def _field_map(obj) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _valid_keys(obj, prefix: str = "") -> List[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_valid_keys(value, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_error(key: str, section, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(section)]
    close = difflib.get_close_matches(key.split(".")[-1], names, n=3)
    hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(prefix + n for n in names)}")


def _coerce(key: str, value: Any, f: dataclasses.Field, current: Any) -> Any:
    """Convert `value` to the type of field `f`, or raise ConfigError naming the key."""
    hint = f.type if not isinstance(f.type, str) else _resolve_hint(f)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    choices = f.metadata.get("choices")

    def fail(expected: str) -> ConfigError:
        extra = f"; valid choices: {', '.join(map(str, choices))}" if choices else ""
        return ConfigError(f"config key '{key}' expects {expected}, got {value!r}{extra}")

    if origin is typing.Union and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        inner = [a for a in args if a is not type(None)][0]
        hint, origin, args = inner, typing.get_origin(inner), typing.get_args(inner)

    if origin in (tuple, Tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(_scalar(key, v, t, fail) for v, t in zip(value, args))

    out = _scalar(key, value, hint, fail)
    if choices is not None and out not in choices:
        raise fail("one of the valid choices")
    return out


def _scalar(key, value, typ, fail):
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise fail("a boolean (true/false)")
    if typ is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail("an integer")
    if typ is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    raise fail(str(typ))


def _resolve_hint(f: dataclasses.Field):
    # Field annotations are strings under `from __future__ import annotations`.
    return eval(f.type, globals())  # noqa: S307 - annotations of this module only


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set dotted `key` (e.g. ``optim.base_lr``) on `cfg`, validating the key and the value."""
    parts = key.split(".")
    section, prefix = cfg, ""
    for i, part in enumerate(parts):
        fields = _field_map(section)
        if part not in fields:
            raise _unknown_key_error(key, section, prefix)
        current = getattr(section, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; set its keys: {', '.join(_valid_keys(current, key + '.'))}")
                for sub_key, sub_value in value.items():
                    set_value(cfg, f"{key}.{sub_key}", sub_value)
                return
            setattr(section, part, _coerce(key, value, fields[part], current))
            return
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section (in '{key}')")
        section, prefix = current, prefix + part + "."


def apply_dict(cfg: Config, values: Dict[str, Any], prefix: str = "") -> Config:
    """Apply a nested mapping (as read from a YAML/JSON file) to `cfg`."""
    for k, v in values.items():
        set_value(cfg, prefix + k, v)
    return cfg


def parse_override(text: str) -> Tuple[str, Any]:
    """Split ``key=value``; the value is parsed as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value)
    return cfg


def load_file(path: str) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a nested dict."""
    if not os.path.exists(path):
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path) as fh:
        text = fh.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file '{path}' could not be parsed: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def to_dict(obj) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


def flat_dict(tree) -> Dict[str, Any]:
    """A config, or its :func:`to_dict` form, as {"section.key": value}."""
    nested = to_dict(tree) if dataclasses.is_dataclass(tree) else tree
    out: Dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat_dict(value).items()})
        else:
            out[key] = value
    return out


def config_differences(a, b) -> Dict[str, List[Any]]:
    """{key: [value in a, value in b]} for every key whose value differs (configs or their dicts)."""
    fa, fb = flat_dict(a), flat_dict(b)
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def from_dict(values: Dict[str, Any]) -> Config:
    return resolve_style_defaults(apply_dict(Config(), values))


def resolve_style_defaults(cfg: Config) -> Config:
    """Settings whose "auto" follows model.style, fixed once all sources are merged (the device-
    dependent "auto" settings are resolved later, by engine.runtime.auto, once the device is known)."""
    if cfg.crops.blur == "auto":
        cfg.crops.blur = "torchvision" if cfg.model.style == "v2" else "pil"
    return cfg


def build_config(preset: Optional[str] = None, config_file: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Merge order: defaults <- preset <- config file <- ``key=value`` overrides."""
    from .presets import get_preset  # local import: presets import this module

    cfg = Config()
    if preset:
        apply_dict(cfg, get_preset(preset))
        cfg.preset = preset
    if config_file:
        values = load_file(config_file)
        base = values.pop("preset", None)
        if base and not preset:
            apply_dict(cfg, get_preset(base))
            cfg.preset = base
        apply_dict(cfg, values)
    apply_overrides(cfg, overrides or [])
    resolve_style_defaults(cfg)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a single key's type cannot express."""
    o, m = cfg.objective, cfg.model
    if cfg.data.batch_size < 1:
        raise ConfigError(f"config key 'data.batch_size' must be >= 1, got {cfg.data.batch_size}")
    if o.eps <= 0:
        raise ConfigError(f"config key 'objective.eps' must be > 0, got {o.eps}")
    if cfg.crops.n_local < 0:
        raise ConfigError(f"config key 'crops.n_local' must be >= 0, got {cfg.crops.n_local}")
    if not 0 <= o.mask_ratio_min <= o.mask_ratio_max <= 1:
        raise ConfigError("config keys 'objective.mask_ratio_min' <= 'objective.mask_ratio_max' must lie in [0, 1]")
    for size_key in ("global_size", "local_size"):
        size = getattr(cfg.crops, size_key)
        if size % m.patch_size:
            raise ConfigError(f"config key 'crops.{size_key}' = {size} is not a multiple of model.patch_size = {m.patch_size}")
    if o.method in ("simdinov2", "dinov2") and m.style != "v2":
        raise ConfigError(f"objective.method={o.method} needs model.style=v2 (mask token for the patch loss)")
    if o.virtual_ranks < 1 or cfg.data.batch_size % o.virtual_ranks:
        raise ConfigError(
            f"config key 'objective.virtual_ranks' = {o.virtual_ranks} must be >= 1 and divide data.batch_size = {cfg.data.batch_size}"
        )
    if not 0.0 <= m.drop_path_rate < 1.0:
        raise ConfigError(f"config key 'model.drop_path_rate' must be in [0, 1), got {m.drop_path_rate}")
    if cfg.runtime.activation_checkpointing < 0:  # its upper bound, the depth, is checked with the model
        raise ConfigError(f"config key 'runtime.activation_checkpointing' must be >= 0 (blocks), "
                          f"got {cfg.runtime.activation_checkpointing}")


def valid_keys() -> List[str]:
    return _valid_keys(Config())


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

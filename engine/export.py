"""Export a checkpoint's teacher backbone as safetensors that timm loads with no key edits.

``--output DIR`` writes a folder with ``model.safetensors`` (the backbone, timm's key names) and
``config.json`` (timm's hub format: architecture, model_args, pretrained_cfg), so any of these work:

  model = timm.create_model("local-dir:EXPORT_DIR", pretrained=True, num_classes=0)
  model = timm.create_model(NAME, num_classes=0, **MODEL_ARGS)                      # then
  model.load_state_dict(safetensors.torch.load_file("EXPORT_DIR/model.safetensors"))

``--output FILE.safetensors`` writes that file and ``FILE.json`` (the same config) beside it; load it
the second way. NAME and MODEL_ARGS are printed and stored in the config; MODEL_ARGS is empty for the standard
DINO-style ViTs at 224 px (e.g. ``vit_small_patch16_224``). The mapping:

* v1 (DINO-style) backbones: our parameter names are timm's ``vit_*_patch16_224`` names; only the
  iBOT ``mask_token`` (absent from timm) is dropped.
* v2 (DINOv2-style) with registers: timm's ``vit_*_reg4_dinov2`` family keeps a patch-only position
  embedding and adds none to CLS (``no_embed_class``), so ``cls_token + pos_embed[:, :1]`` is
  exported as ``cls_token`` and ``pos_embed[:, 1:]`` as ``pos_embed``; ``reg_token`` maps 1:1.
  Without registers: timm's ``vit_*_dinov2`` (CLS position embedding kept) maps 1:1.
* Layerscale ``ls*.gamma`` maps 1:1 (timm's ``init_values``; 0 = none: timm's create_model drops
  None-valued arguments, so None could not switch off the DINOv2 default 1e-5).

The features agree with flashdino's at the native input size. At other sizes both models resample
the position embedding, but not identically (v1 uses a +0.1 scale-factor offset, timm does not).

Example:
  flashdino export --checkpoint runs/demo/checkpoint.pth --output runs/demo/export
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Tuple

import torch

from flashdino.engine.models import ARCH_SPECS

TIMM_SIZES = {"vit_tiny": "tiny", "vit_small": "small", "vit_base": "base", "vit_large": "large"}
# timm registers these DINOv2 sizes; others use the closest one with explicit sizes in model_args.
TIMM_DINOV2_SIZES = ("small", "base", "large")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def timm_architecture(model_cfg) -> Tuple[str, Dict[str, Any]]:
    """(timm model name, model_args) of the timm VisionTransformer equal to this backbone."""
    spec = dict(ARCH_SPECS[model_cfg.arch], mlp_ratio=model_cfg.mlp_ratio)
    for key in ("embed_dim", "depth", "num_heads"):
        if getattr(model_cfg, key):
            spec[key] = getattr(model_cfg, key)
    size = TIMM_SIZES[model_cfg.arch]
    registers = model_cfg.num_register_tokens
    if model_cfg.style == "v1" and registers == 0:
        name = f"vit_{size}_patch16_224"
        defaults = dict(ARCH_SPECS[model_cfg.arch], patch_size=16, img_size=224, in_chans=3)
        wanted = dict(spec, patch_size=model_cfg.patch_size, img_size=model_cfg.img_size, in_chans=model_cfg.in_chans)
        args = {k: v for k, v in wanted.items() if defaults.get(k) != v}
        if model_cfg.layerscale:
            args["init_values"] = model_cfg.layerscale
        return name, args
    # DINOv2-style (or v1 with registers): always explicit, timm's DINOv2 defaults (patch 14, 518 px) differ.
    timm_size = size if size in TIMM_DINOV2_SIZES else "small"
    no_embed_class = registers > 0
    name = f"vit_{timm_size}_patch14_reg4_dinov2" if no_embed_class else f"vit_{timm_size}_patch14_dinov2"
    args = dict(spec, patch_size=model_cfg.patch_size, img_size=model_cfg.img_size, in_chans=model_cfg.in_chans,
                init_values=float(model_cfg.layerscale), reg_tokens=registers, no_embed_class=no_embed_class)
    return name, args


def to_timm_state_dict(state: Dict[str, torch.Tensor], num_register_tokens: int) -> Dict[str, torch.Tensor]:
    """Our backbone state dict -> timm's (contiguous copies; safetensors needs them)."""
    out = {k: v.detach().clone().contiguous() for k, v in state.items() if k != "mask_token"}
    if num_register_tokens > 0:
        pos = state["pos_embed"]
        out["cls_token"] = (state["cls_token"] + pos[:, :1]).contiguous()
        out["pos_embed"] = pos[:, 1:].clone().contiguous()
    return out


def output_paths(output: str) -> Tuple[str, str]:
    """(weights file, config file) for ``--output``: a folder, or a ``.safetensors`` file path."""
    if output.endswith(".safetensors"):
        return output, output[: -len(".safetensors")] + ".json"
    return os.path.join(output, WEIGHTS_FILE), os.path.join(output, CONFIG_FILE)


def export_backbone(checkpoint: str, output: str, which: str = "teacher") -> Dict[str, Any]:
    """Write the weights and timm config (see :func:`output_paths`); returns the config."""
    from safetensors.torch import save_file

    from flashdino.engine.eval.backbone import load_backbone

    backbone, cfg, info = load_backbone(checkpoint, which)
    name, model_args = timm_architecture(cfg.model)
    tensors = to_timm_state_dict(backbone.state_dict(), cfg.model.num_register_tokens)
    size = cfg.model.img_size
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": backbone.embed_dim,
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": f"flashdino_{cfg.objective.method}",
            "input_size": [cfg.model.in_chans, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": cfg.eval.eval_size / cfg.eval.resize_size,
            "crop_mode": "center",
            "mean": list(cfg.crops.mean),
            "std": list(cfg.crops.std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "flashdino": {"checkpoint": os.path.abspath(checkpoint), "which": which, "step": info["step"],
                      "method": cfg.objective.method, "style": cfg.model.style},
    }
    weights_path, config_path = output_paths(output)
    os.makedirs(os.path.dirname(os.path.abspath(weights_path)), exist_ok=True)
    metadata = {"format": "pt", "timm_architecture": name, "timm_model_args": json.dumps(model_args)}
    save_file(tensors, weights_path, metadata=metadata)
    with open(config_path, "w") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a flashdino train checkpoint (checkpoint.pth)")
    parser.add_argument("--output", "--out", dest="output", required=True,
                        help="a folder (gets model.safetensors + config.json, loadable as timm 'local-dir:') "
                             "or a FILE.safetensors path (gets FILE.json beside it)")
    parser.add_argument("--which", default="teacher", choices=("teacher", "student"), help="which backbone to export")


def main(args) -> int:
    from flashdino.engine.eval.cli_common import fail, user_errors

    try:
        config = export_backbone(args.checkpoint, args.output, args.which)
    except user_errors() as exc:
        return fail(str(exc))
    name, model_args = config["architecture"], config["model_args"]
    extra = "".join(f", {k}={v!r}" for k, v in model_args.items())
    weights, config_path = output_paths(args.output)
    print(f"wrote {weights} and {config_path} ({args.which} backbone, step {config['flashdino']['step']})",
          file=sys.stderr)
    if not args.output.endswith(".safetensors"):
        print(f'timm.create_model("local-dir:{os.path.abspath(args.output)}", pretrained=True, num_classes=0)')
    print(f'timm.create_model("{name}", num_classes=0{extra}).load_state_dict('
          f'safetensors.torch.load_file("{weights}"))')
    return 0

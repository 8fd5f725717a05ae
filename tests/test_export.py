"""flashdino export -> timm round trip: the safetensors load with no key edits (strict) into the
matching timm VisionTransformer, and timm's CLS features equal flashdino's on the same input."""
import json
import os

import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from flashdino.engine.cli import main as cli_main  # noqa: E402
from flashdino.engine.config import build_config, to_dict  # noqa: E402
from flashdino.engine.export import export_backbone, timm_architecture  # noqa: E402
from flashdino.engine.meta_arch import SSLMetaArch  # noqa: E402


def _checkpoint(tmp_path, overrides, seed=0):
    """A checkpoint in the trainer's format, with a teacher that differs from the student."""
    cfg = build_config(None, None, ["data.dataset=synthetic", "crops.global_size=32", "crops.local_size=16",
                                    "head.hidden_dim=32", "head.bottleneck_dim=16"] + overrides)
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    with torch.no_grad():  # move the teacher off its init so "teacher" is really what gets exported
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = os.path.join(tmp_path, "checkpoint.pth")
    torch.save({"student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                "config": to_dict(cfg), "train_state": {"step": 7}}, path)
    return path, model.teacher["backbone"].eval(), cfg


def _same_features(ours, theirs, size, in_chans=3, tol=1e-9):
    """CLS features in float64: exact up to summation order, or `tol` where the export rounds a sum to fp32."""
    x = torch.randn(3, in_chans, size, size, dtype=torch.float64)
    ours, theirs = ours.double().eval(), theirs.double().eval()
    with torch.no_grad():
        a = ours.forward_features(x)["cls"]
        b = theirs(x)
    assert b.shape == a.shape
    torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_v1_standard_vit_loads_by_name_alone(tmp_path):
    path, teacher, cfg = _checkpoint(tmp_path, ["model.arch=vit_tiny", "model.drop_path_rate=0.1"])
    out = os.path.join(tmp_path, "export")
    config = export_backbone(path, out)
    assert config["architecture"] == "vit_tiny_patch16_224" and config["model_args"] == {}
    state = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    model.load_state_dict(state, strict=True)  # no key edits
    assert set(state) == set(model.state_dict())
    _same_features(teacher, model, 224)


def test_v2_registers_layerscale_local_dir(tmp_path):
    path, teacher, cfg = _checkpoint(tmp_path, [
        "model.style=v2", "model.num_register_tokens=4", "model.layerscale=0.1", "model.img_size=32",
        "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "objective.method=simdinov2"])
    out = os.path.join(tmp_path, "export")
    config = export_backbone(path, out)
    assert config["architecture"] == "vit_small_patch14_reg4_dinov2"
    state = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    assert "mask_token" not in state and state["pos_embed"].shape == (1, 4, 48)
    ours = teacher.state_dict()
    torch.testing.assert_close(state["cls_token"], ours["cls_token"] + ours["pos_embed"][:, :1])
    torch.testing.assert_close(state["reg_token"], ours["reg_token"])
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    assert set(state) == set(model.state_dict())
    # cls_token + pos_embed[:, :1] is stored in float32: agreement to float32 rounding, not exactly.
    _same_features(teacher, model, 32, tol=1e-6)


def test_v2_without_registers_maps_one_to_one(tmp_path):
    path, teacher, cfg = _checkpoint(tmp_path, [
        "model.style=v2", "model.img_size=32", "model.arch=vit_base", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.mlp_ratio=2.0"])
    out = os.path.join(tmp_path, "export")
    config = export_backbone(path, out)
    name, args = config["architecture"], config["model_args"]
    assert name == "vit_base_patch14_dinov2" and args["init_values"] == 0 and not args["no_embed_class"]
    model = timm.create_model(name, num_classes=0, **args)
    model.load_state_dict(safetensors_torch.load_file(os.path.join(out, "model.safetensors")), strict=True)
    _same_features(teacher, model, 32)


def test_cli_export_prints_the_loading_call(tmp_path, capsys):
    path, teacher, cfg = _checkpoint(tmp_path, ["model.img_size=32", "model.embed_dim=32", "model.depth=1",
                                                "model.num_heads=2"])
    out = os.path.join(tmp_path, "exp")
    assert cli_main(["export", "--checkpoint", path, "--output", out, "--which", "student"]) == 0
    printed = capsys.readouterr().out
    assert f"local-dir:{os.path.abspath(out)}" in printed and "vit_small_patch16_224" in printed
    with open(os.path.join(out, "config.json")) as fh:
        config = json.load(fh)
    assert config["flashdino"]["which"] == "student" and config["flashdino"]["step"] == 7
    assert config["model_args"] == {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}
    assert timm_architecture(cfg.model) == (config["architecture"], config["model_args"])


def test_cli_export_to_a_safetensors_file(tmp_path, capsys):
    path, teacher, cfg = _checkpoint(tmp_path, ["model.img_size=32", "model.embed_dim=32", "model.depth=1",
                                                "model.num_heads=2"])
    target = os.path.join(tmp_path, "out", "vit.safetensors")
    assert cli_main(["export", "--checkpoint", path, "--out", target]) == 0
    assert "load_file" in capsys.readouterr().out
    with open(os.path.join(tmp_path, "out", "vit.json")) as fh:
        config = json.load(fh)
    model = timm.create_model(config["architecture"], num_classes=0, **config["model_args"])
    model.load_state_dict(safetensors_torch.load_file(target), strict=True)
    _same_features(teacher, model, 32)


def test_cli_export_missing_checkpoint_is_a_clean_error(tmp_path, capsys):
    missing = os.path.join(tmp_path, "nope.pth")
    assert cli_main(["export", "--checkpoint", missing, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err and "Traceback" not in err

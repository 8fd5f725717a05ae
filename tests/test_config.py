import json

import pytest

from flashdino.engine.config import ConfigError, build_config, valid_keys
from flashdino.engine.presets import list_presets


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds(name):
    cfg = build_config(name)
    assert cfg.preset == name


def test_paper_presets_match_spec():
    v1 = build_config("simdino_vitb16")
    assert (v1.model.arch, v1.model.patch_size, v1.crops.n_local, v1.objective.eps) == ("vit_base", 16, 10, 0.05)
    assert (v1.optim.clip_mode, v1.optim.schedule_style, v1.teacher.momentum) == ("per_param", "v1", 0.996)
    v2 = build_config("simdinov2_vitb16")
    assert (v2.model.style, v2.model.layerscale, v2.model.num_register_tokens) == ("v2", 0.1, 4)
    assert (v2.model.drop_path_rate, v2.teacher.momentum, v2.optim.layerwise_decay) == (0.2, 0.9, 0.9)
    assert build_config("simdino_vits16").model.arch == "vit_small"


def test_unknown_key_names_key_and_choices():
    with pytest.raises(ConfigError) as err:
        build_config("demo", overrides=["optim.base_lrr=0.1"])
    msg = str(err.value)
    assert "optim.base_lrr" in msg and "optim.base_lr" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.lr'"):
        build_config(overrides=["optimizer.lr=1"])


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="'data.batch_size' expects an integer"):
        build_config(overrides=["data.batch_size=abc"])
    with pytest.raises(ConfigError, match="valid choices: simdino, simdinov2, dino, dinov2"):
        build_config(overrides=["objective.method=byol"])
    with pytest.raises(ConfigError, match="expects a list of 2 values"):
        build_config(overrides=["crops.global_scale=0.5"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="valid presets"):
        build_config("simdino_vitz99")


def test_config_file_and_override_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: simdino_vitb16\noptim: {base_lr: 0.001}\ndata: {batch_size: 32}\n")
    cfg = build_config(config_file=str(path), overrides=["data.batch_size=16"])
    assert cfg.model.arch == "vit_base" and cfg.optim.base_lr == 0.001 and cfg.data.batch_size == 16
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"archh": "vit_base"}}))
    with pytest.raises(ConfigError, match="model.archh"):
        build_config(config_file=str(bad))


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        build_config(overrides=["crops.local_size=100"])
    with pytest.raises(ConfigError, match="needs model.style=v2"):
        build_config(overrides=["objective.method=simdinov2"])


def test_valid_keys_lists_nested_sections():
    keys = valid_keys()
    assert "runtime.kernels.ema" in keys and "objective.expa_type" in keys


@pytest.mark.parametrize("overrides, blur", [
    ([], "pil"),  # v1 tree: PIL GaussianBlur(radius) (spec 1.1)
    (["objective.method=simdinov2", "model.style=v2"], "torchvision"),  # v2 tree without a preset
    (["model.style=v2", "crops.blur=pil"], "pil"),  # an explicit choice stays
])
def test_blur_auto_follows_the_model_style(overrides, blur):
    from flashdino.engine.config import from_dict, to_dict

    cfg = build_config(None, overrides=overrides)
    assert cfg.crops.blur == blur
    assert to_dict(cfg)["crops"]["blur"] == blur  # what a checkpoint records is what ran
    raw = {"model": {"style": cfg.model.style}, "crops": {"blur": "auto"}}
    assert from_dict(raw).crops.blur == ("torchvision" if cfg.model.style == "v2" else "pil")

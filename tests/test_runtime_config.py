"""Runtime selection and the requests the runtimes refuse, each with a message naming the fix."""
import pytest
import torch

from flashdino.engine.config import build_config
from flashdino.engine.runtime import DistributedConfigError, resolve_runtime
from flashdino.engine.runtime.deepspeed_backend import check_deepspeed_request, deepspeed_config


@pytest.mark.parametrize("distributed, stage, world, expected", [
    ("auto", 0, 1, "local"), ("auto", 0, 2, "ddp"), ("auto", 2, 1, "deepspeed"), ("auto", 3, 8, "deepspeed"),
    ("none", 0, 1, "local"), ("ddp", 0, 1, "local"), ("ddp", 0, 4, "ddp"), ("deepspeed", 1, 1, "deepspeed"),
])
def test_runtime_resolution(distributed, stage, world, expected):
    assert resolve_runtime(distributed, stage, world) == expected


def test_unsynchronised_or_contradictory_requests_are_refused():
    with pytest.raises(DistributedConfigError, match="never be averaged"):
        resolve_runtime("none", 0, 2)
    with pytest.raises(DistributedConfigError, match="needs runtime.distributed=deepspeed"):
        resolve_runtime("ddp", 2, 2)


def _cfg(*overrides):
    return build_config("simdino_vits16", overrides=["runtime.distributed=deepspeed", "train.precision=bf16", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (("runtime.zero_stage=0",), "use runtime.distributed=ddp"),
    (("runtime.zero_stage=2", "train.precision=fp16"), "bf16 or fp32"),
    (("runtime.zero_stage=3", "runtime.compile=block"), "Use runtime.zero_stage=2"),
])
def test_deepspeed_requests_it_cannot_serve_are_refused(overrides, message):
    with pytest.raises(DistributedConfigError, match=message):
        check_deepspeed_request(_cfg(*overrides))


def test_dino_prototype_freeze_is_refused_under_zero():
    cfg = build_config("dino_vits16", overrides=["runtime.distributed=deepspeed", "runtime.zero_stage=1", "train.precision=bf16"])
    with pytest.raises(DistributedConfigError, match="freeze_last_layer_epochs=0"):
        check_deepspeed_request(cfg)


def test_deepspeed_config_follows_the_run():
    cfg = _cfg("runtime.zero_stage=3", "train.precision=bf16", "data.batch_size=64")
    ds = deepspeed_config(cfg, world_size=8, device=__import__("torch").device("cpu"))
    assert ds["train_batch_size"] == 512 and ds["train_micro_batch_size_per_gpu"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 0.0  # spec clipping runs on the shards instead


def test_auto_runtime_is_eager_on_cpu_and_fast_on_gpu():
    from flashdino.engine.runtime.auto import resolve_auto

    cfg = build_config("simdino_vitb16")
    assert cfg.runtime.compile == "auto" and cfg.runtime.kernels.coding_rate == "auto"
    cpu = resolve_auto(cfg, torch.device("cpu"))
    assert cpu.runtime.compile == "none" and {cpu.runtime.kernels.ema, cpu.runtime.kernels.centering,
                                              cpu.runtime.kernels.coding_rate} == {"eager"}
    gpu = resolve_auto(cfg, torch.device("cuda", 0))
    assert gpu.runtime.compile == "block" and {gpu.runtime.kernels.ema, gpu.runtime.kernels.centering,
                                               gpu.runtime.kernels.coding_rate} == {"triton"}
    zero3 = build_config("simdinov2_vitb16", overrides=["runtime.distributed=deepspeed", "runtime.zero_stage=3"])
    assert resolve_auto(zero3, torch.device("cuda", 0)).runtime.compile == "none"
    zero3_auto = build_config("simdinov2_vitb16", overrides=["runtime.zero_stage=3"])  # distributed=auto: DeepSpeed too
    assert zero3_auto.runtime.distributed == "auto"
    assert resolve_auto(zero3_auto, torch.device("cuda", 0)).runtime.compile == "none"
    full = resolve_auto(build_config("dino_vits16", overrides=["runtime.compile=full"]), torch.device("cuda", 0))
    assert (full.runtime.kernels.centering, full.runtime.kernels.coding_rate, full.runtime.kernels.ema) == (
        "eager", "eager", "triton")  # the loss is traced by inductor; the EMA runs outside the graph
    explicit = build_config("simdino_vitb16", overrides=["runtime.compile=full", "runtime.kernels.ema=eager"])
    resolved = resolve_auto(explicit, torch.device("cuda", 0))
    assert resolved.runtime.compile == "full" and resolved.runtime.kernels.ema == "eager"
    assert cfg.runtime.compile == "auto"  # the caller's config is not modified

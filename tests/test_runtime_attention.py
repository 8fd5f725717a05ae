"""The attention-kernel check: it names the kernel that really ran, and refuses a silent fallback."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from flashdino.engine.models import attention as attn_mod
from flashdino.engine.models.vit import VisionTransformer
from flashdino.engine.runtime.attention_check import (AttentionKernelError, check_model_attention, classify_ops,
                                                      flash_attn_kernels, probe_attention)

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def test_operator_names_map_to_kernel_families():
    assert classify_ops(["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
                         "aten::_scaled_dot_product_flash_attention_backward"]) == {
        "flash": ["aten::_scaled_dot_product_flash_attention"]}
    assert set(classify_ops(["aten::_scaled_dot_product_cudnn_attention"])) == {"cudnn"}
    assert set(classify_ops(["aten::_scaled_dot_product_efficient_attention"])) == {"efficient"}
    assert set(classify_ops(["flash_attn::_flash_attn_forward"])) == {"flash_attn"}
    assert set(classify_ops(["flash_attn_3::fwd"])) == {"flash_attn"}
    # kernel names (old flash-attn without torch ops): the package's, never PyTorch's bundled copy
    assert flash_attn_kernels(["void flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "ampere_sgemm",
                               "void pytorch_flash::flash_fwd_kernel<X>"]) == [
        "void flash_fwd_kernel<Flash_fwd_kernel_traits<64>>"]
    fa3 = "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<X>>>(Params)"
    assert flash_attn_kernels([fa3, "sm90_xmma_gemm_bf16"]) == [fa3]  # FlashAttention-3's Hopper kernels
    assert set(classify_ops(["aten::matmul", "aten::softmax", "aten::_softmax"])) == {"explicit_math"}
    # softmax next to a fused SDPA kernel is not the explicit path
    assert set(classify_ops(["aten::softmax", "aten::_scaled_dot_product_attention_math"])) == {"sdpa_math"}
    assert classify_ops(["aten::mm", "aten::add"]) == {}


@pytest.mark.parametrize("backend, family", [("sdpa", "cpu_flash"), ("math", "explicit_math")])
def test_cpu_probe_reports_the_kernel_that_ran(backend, family):
    report = probe_attention(backend, num_heads=3, head_dim=16, tokens=17, device="cpu", dtype=torch.float32)
    assert report.ok and report.kernels == [family]
    assert report.shape == (1, 3, 17, 16) and report.dtype == "float32"
    assert family in report.describe() and backend in report.describe()


def test_probe_uses_the_autocast_dtype():
    report = probe_attention("sdpa", 2, 16, 9, "cpu", torch.float32, autocast_dtype=torch.bfloat16)
    assert report.dtype == "bfloat16" and report.ok


def test_a_silent_fallback_is_refused(monkeypatch):
    # A "math" backend that secretly calls SDPA (which picks a fused kernel) is not the math path...
    monkeypatch.setattr(attn_mod, "scaled_dot_product", lambda q, k, v, backend, scale=None: F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(AttentionKernelError, match="expected explicit_math"):
        probe_attention("math", 2, 16, 9, "cpu", torch.float32)
    # ...and a "flash_attn" backend that ran anything but the flash-attn kernels fails the same way.
    with pytest.raises(AttentionKernelError, match="backend 'flash_attn'.*ran cpu_flash"):
        probe_attention("flash_attn", 2, 16, 9, "cpu", torch.float32)


def test_model_check_reads_the_backbone_geometry():
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3, attention="math")
    report = check_model_attention(vit, tokens=17, device="cpu")
    assert report.shape == (1, 3, 17, 8) and report.kernels == ["explicit_math"]


def test_forced_gpu_backends_explain_themselves_on_cpu():
    with pytest.raises(RuntimeError, match="'flash' needs fp16/bf16 CUDA tensors"):
        probe_attention("flash", 2, 16, 9, "cpu", torch.float32)


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here")
def test_flash_attn_status_is_none_without_the_package(monkeypatch):
    monkeypatch.setattr(attn_mod, "_flash_attn_func", None)
    assert attn_mod.flash_attn_status() is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend, family", [("flash", "flash"), ("cudnn", "cudnn")])
def test_gpu_forced_sdpa_kernels_really_run(backend, family):
    report = probe_attention(backend, 12, 64, 197, "cuda", torch.float32, autocast_dtype=torch.bfloat16)
    assert report.kernels == [family]


@pytest.mark.gpu
def test_gpu_sdpa_does_not_fall_back_to_math_for_vit_b():
    report = probe_attention("sdpa", 12, 64, 197, "cuda", torch.float32, autocast_dtype=torch.bfloat16, strict=True)
    assert "sdpa_math" not in report.kernels


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn package not installed")
def test_gpu_flash_attn_package_kernels_run():
    report = probe_attention("flash_attn", 12, 64, 197, "cuda", torch.bfloat16)
    assert report.kernels == ["flash_attn"]
    assert attn_mod.flash_attn_status().startswith("FlashAttention-")

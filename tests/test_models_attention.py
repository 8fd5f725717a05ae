"""Attention backends (engine/models/attention.py): every path against a float64 NumPy softmax."""
import importlib.util

import numpy as np
import pytest
import torch

from flashdino.engine.models import attention as attn_mod
from flashdino.engine.models.attention import BACKENDS, attention_probs, scaled_dot_product
from flashdino.engine.models.layers import Attention

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def numpy_attention(q, k, v, scale):
    """softmax(q k^T * scale) v in float64, (B, H, T, hd) arrays."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    logits = np.einsum("bhid,bhjd->bhij", q, k) * scale
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", p, v), p


def _qkv(dtype=torch.float32, shape=(2, 3, 11, 8), device="cpu"):
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_cpu_backends_match_float64_reference(backend):
    q, k, v = _qkv(torch.float64)
    scale = q.shape[-1] ** -0.5
    ref, _ = numpy_attention(q, k, v, scale)
    out = scaled_dot_product(q, k, v, backend)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_math_path_close_to_sdpa_in_fp32():
    q, k, v = _qkv(torch.float32, shape=(3, 4, 37, 16))
    torch.testing.assert_close(scaled_dot_product(q, k, v, "math"), scaled_dot_product(q, k, v, "sdpa"), rtol=1e-5, atol=1e-5)


def test_custom_scale_is_used():
    q, k, v = _qkv(torch.float64)
    ref, _ = numpy_attention(q, k, v, 0.37)
    for backend in ("sdpa", "math"):
        np.testing.assert_allclose(scaled_dot_product(q, k, v, backend, scale=0.37).numpy(), ref, rtol=1e-10, atol=1e-12)


def test_attention_probs_rows_are_softmax():
    q, k, _ = _qkv(torch.float64)
    _, ref_p = numpy_attention(q, k, k, q.shape[-1] ** -0.5)
    p = attention_probs(q, k)
    np.testing.assert_allclose(p.numpy(), ref_p, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-12)


def test_attention_module_matches_float64_reference():
    torch.manual_seed(0)
    dim, heads = 24, 3
    m = Attention(dim, heads).double()
    x = torch.randn(2, 7, dim, dtype=torch.float64)
    wq, bq = m.qkv.weight.detach().numpy(), m.qkv.bias.detach().numpy()
    qkv = x.numpy() @ wq.T + bq  # (B, T, 3D), split as [q | k | v], each head-major
    b, t, _ = qkv.shape
    qkv = qkv.reshape(b, t, 3, heads, dim // heads).transpose(2, 0, 3, 1, 4)
    o, _ = numpy_attention(qkv[0], qkv[1], qkv[2], (dim // heads) ** -0.5)
    o = o.transpose(0, 2, 1, 3).reshape(b, t, dim)
    ref = o @ m.proj.weight.detach().numpy().T + m.proj.bias.detach().numpy()
    for backend in ("sdpa", "math"):
        m.backend = backend
        np.testing.assert_allclose(m(x).detach().numpy(), ref, rtol=1e-10, atol=1e-12)


def test_unknown_backend_is_rejected_with_choices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="valid backends: sdpa, flash, cudnn, math, flash_attn"):
        scaled_dot_product(q, k, v, "xformers")
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        Attention(16, 2, backend="fast")


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_forced_sdpa_backends_explain_cpu_fp32_inputs(backend):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=f"'{backend}' needs fp16/bf16 CUDA tensors"):
        scaled_dot_product(q, k, v, backend)


def test_fp32_inputs_under_autocast_get_the_autocast_dtype():
    # The half-only kernels saw fp32 q (the trainer's attention probe builds fp32 tensors and runs
    # them under autocast) and refused; now they get what autocast would give a matmul.
    q, k, v = _qkv()
    assert all(t.dtype == torch.float32 for t in attn_mod.autocast_inputs(q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.bfloat16 for t in attn_mod.autocast_inputs(q, k, v))
        half = q.half()
        assert attn_mod.autocast_inputs(half, half, half)[0].dtype == torch.float16  # not fp32: untouched
        # on the CPU the cast happens and the device is what the message now names
        with pytest.raises(RuntimeError, match="got torch.bfloat16 on cpu"):
            scaled_dot_product(q, k, v, "flash")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_gpu_forced_backends_take_fp32_inputs_under_autocast(backend):
    q, k, v = _qkv(torch.float32, shape=(2, 4, 200, 64), device="cuda")
    ref, _ = numpy_attention(q.cpu(), k.cpu(), v.cpu(), 64 ** -0.5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = scaled_dot_product(q, k, v, backend)
    assert out.dtype == torch.bfloat16
    np.testing.assert_allclose(out.float().cpu().numpy(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash-attn is installed here; the missing-package message cannot be shown")
def test_flash_attn_missing_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(attn_mod, "_flash_attn_func", None)
    q, k, v = _qkv()
    with pytest.raises(ImportError, match="pip install flash-attn"):
        scaled_dot_product(q, k, v, "flash_attn")
    with pytest.raises(ImportError, match="flash-attn package"):
        Attention(16, 2, backend="flash_attn")  # fails at build time, not at the first step


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "math"])
def test_gpu_backends_match_math_path(backend, dtype):
    if backend == "flash_attn" and not HAS_FLASH_ATTN:
        pytest.skip("flash-attn package not installed")
    q, k, v = _qkv(dtype, shape=(2, 4, 200, 64), device="cuda")
    ref, _ = numpy_attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), 64 ** -0.5)
    out = scaled_dot_product(q, k, v, backend)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    np.testing.assert_allclose(out.float().cpu().numpy(), ref, atol=tol, rtol=tol)

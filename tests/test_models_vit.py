"""VisionTransformer (engine/models/vit.py): float64 parity with a NumPy ViT, shapes, masks,
pos-embed use, init, parameter counts, stochastic depth wiring, builders, timm key names."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import erf

from flashdino.engine.config import ModelConfig, build_config
from flashdino.engine.models import ARCH_SPECS, build_backbone, build_head
from flashdino.engine.presets import list_presets
from flashdino.engine.models.pos_embed import interpolate_pos_embed
from flashdino.engine.models.vit import VisionTransformer


def tiny_vit(**kw):
    args = dict(img_size=28, patch_size=4, embed_dim=24, depth=2, num_heads=3)
    args.update(kw)
    return VisionTransformer(**args)


# ------------------------------------------------------------------ independent float64 ViT
def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def numpy_vit_tokens(P, img, patch, n_reg, n_blocks, heads, masks=None, layerscale=False):
    """Pre-final-norm-free forward of a ViT from its state_dict `P` (float64 arrays).
    Returns the final-LayerNorm tokens (B, 1 + R + N, D) and the last block's attention probs."""
    b, c, hh, ww = img.shape
    gh, gw = hh // patch, ww // patch
    # conv with kernel = stride = patch == a matmul on flattened (C, p, p) patches
    x = img.reshape(b, c, gh, patch, gw, patch).transpose(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * patch * patch)
    w = P["patch_embed.proj.weight"]
    x = x @ w.reshape(w.shape[0], -1).T + P["patch_embed.proj.bias"]
    if masks is not None:
        x = np.where(masks[..., None], P["mask_token"][0], x)
    pos = P["pos_embed"][0]
    cls = np.broadcast_to(P["cls_token"][0] + pos[:1], (b, 1, x.shape[-1]))
    parts = [cls]
    if n_reg:
        parts.append(np.broadcast_to(P["reg_token"], (b, n_reg, x.shape[-1])))
    parts.append(x + pos[1:])
    h = np.concatenate(parts, axis=1)
    d = h.shape[-1]
    hd = d // heads
    for i in range(n_blocks):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in P.items() if k.startswith(f"blocks.{i}.")}
        y = _ln(h, p["norm1.weight"], p["norm1.bias"])
        qkv = (y @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]).reshape(b, -1, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))
        s = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(hd)
        attn = np.exp(s - s.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        o = np.einsum("bhij,bhjd->bhid", attn, v).transpose(0, 2, 1, 3).reshape(b, -1, d)
        o = o @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        h = h + (p["ls1.gamma"] * o if layerscale else o)
        y = _ln(h, p["norm2.weight"], p["norm2.bias"])
        y = y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
        y = 0.5 * y * (1 + erf(y / math.sqrt(2)))
        y = y @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
        h = h + (p["ls2.gamma"] * y if layerscale else y)
    return _ln(h, P["norm.weight"], P["norm.bias"]), attn


def _perturb(model, seed):
    # make every parameter non-trivial (zero mask token / unit LN would hide wiring mistakes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize(
    "style,n_reg,layerscale,use_masks",
    [("v1", 0, 0.0, False), ("v2", 4, 0.1, True), ("v2", 0, 0.0, False), ("v1", 2, 1e-5, False)],
)
def test_forward_features_matches_float64_numpy_vit(style, n_reg, layerscale, use_masks):
    torch.manual_seed(0)
    m = tiny_vit(style=style, num_register_tokens=n_reg, layerscale=layerscale, drop_path_rate=0.2).double().eval()
    _perturb(m, 1)
    x = torch.randn(3, 3, 28, 28, dtype=torch.float64)
    masks = torch.rand(3, 49) < 0.4 if use_masks else None
    out = m.forward_features(x, masks)
    P = {k: v.numpy() for k, v in m.state_dict().items()}
    ref, _ = numpy_vit_tokens(P, x.numpy(), 4, n_reg, 2, 3, None if masks is None else masks.numpy(), bool(layerscale))
    np.testing.assert_allclose(out["cls"].detach().numpy(), ref[:, 0], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["reg"].detach().numpy(), ref[:, 1 : 1 + n_reg], rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out["patch"].detach().numpy(), ref[:, 1 + n_reg :], rtol=1e-9, atol=1e-10)
    if masks is None:
        torch.testing.assert_close(m(x), out["cls"], rtol=0, atol=0)


def test_last_selfattention_matches_numpy():
    torch.manual_seed(1)
    m = tiny_vit(style="v2", num_register_tokens=1, layerscale=0.1).double().eval()
    _perturb(m, 2)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    attn = m.get_last_selfattention(x)
    assert attn.shape == (2, 3, 1 + 1 + 49, 1 + 1 + 49)
    _, ref = numpy_vit_tokens({k: v.numpy() for k, v in m.state_dict().items()}, x.numpy(), 4, 1, 2, 3, layerscale=True)
    np.testing.assert_allclose(attn.detach().numpy(), ref, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    "img,patch,size,n_reg",
    [(224, 16, 224, 0), (224, 16, 96, 4), (28, 4, 28, 0), (28, 4, 12, 4), (224, 16, 48, 0)],
)
def test_output_shapes_and_registers_excluded(img, patch, size, n_reg):
    m = VisionTransformer(img_size=img, patch_size=patch, embed_dim=16, depth=1, num_heads=2, num_register_tokens=n_reg)
    out = m.forward_features(torch.randn(2, 3, size, size))
    n = (size // patch) ** 2
    assert out["cls"].shape == (2, 16) and out["patch"].shape == (2, n, 16) and out["reg"].shape == (2, n_reg, 16)
    assert m(torch.randn(2, 3, size, size)).shape == (2, 16)


def test_non_square_crop():
    m = tiny_vit(style="v2")
    out = m.forward_features(torch.randn(1, 3, 16, 32))
    assert out["patch"].shape == (1, 4 * 8, 24)


def test_intermediate_layers():
    torch.manual_seed(2)
    m = tiny_vit(depth=3, num_register_tokens=2).eval()
    x = torch.randn(2, 3, 12, 12)
    layers = m.get_intermediate_layers(x, n=2)
    assert len(layers) == 2 and all(t.shape == (2, 1 + 2 + 9, 24) for t in layers)
    feats = m.forward_features(x)
    torch.testing.assert_close(layers[-1], torch.cat([feats["cls"][:, None], feats["reg"], feats["patch"]], 1))
    raw = m.get_intermediate_layers(x, n=1, norm=False)[0]
    torch.testing.assert_close(m.norm(raw), layers[-1])
    assert not torch.allclose(raw, layers[-1])
    first = m.get_intermediate_layers(x, n=[0], norm=False)[0]
    torch.testing.assert_close(first, m.blocks[0](m.prepare_tokens(x)))
    with pytest.raises(ValueError, match=r"n must be in \[1, 3\]"):
        m.get_intermediate_layers(x, n=4)
    with pytest.raises(ValueError, match="out of range"):
        m.get_intermediate_layers(x, n=[5])


# ------------------------------------------------------------------ mask token and pos-embed
def test_mask_token_replaces_masked_patches_before_pos_embed():
    torch.manual_seed(3)
    m = tiny_vit(style="v2", num_register_tokens=4)
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 28, 28)
    masks = torch.zeros(2, 49, dtype=torch.bool)
    masks[0, [0, 5, 48]] = True
    masks[1, 10:20] = True
    tokens = m.prepare_tokens(x, masks)[:, 5:]
    pos = m.pos_embed[0, 1:]
    expected = torch.where(masks[..., None], m.mask_token + pos, m.patch_embed(x) + pos)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    # masked content does not leak: changing the pixels of masked patch 0 of image 0 changes nothing
    x2 = x.clone()
    x2[0, :, :4, :4] += 10.0
    torch.testing.assert_close(m.prepare_tokens(x2, masks), m.prepare_tokens(x, masks), rtol=0, atol=0)
    assert not torch.equal(m.prepare_tokens(x2), m.prepare_tokens(x))


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_model_uses_style_pos_embed_interpolation(style):
    torch.manual_seed(4)
    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=1, num_heads=2, style=style, num_register_tokens=2)
    x = torch.randn(2, 3, 96, 96)
    pos = m.prepare_tokens(x) - torch.cat([m.cls_token.expand(2, 1, 16) * 0, m.reg_token.expand(2, -1, -1), m.patch_embed(x)], 1)
    grid = m.pos_embed[:, 1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    if style == "v1":
        ref = F.interpolate(grid, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic", antialias=False)
    else:
        ref = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True)
    torch.testing.assert_close(pos[:, 3:], ref.permute(0, 2, 3, 1).reshape(1, 36, 16).expand(2, -1, -1))
    torch.testing.assert_close(pos[:, 0], (m.cls_token[0] + m.pos_embed[0, :1]).expand(2, -1))
    torch.testing.assert_close(pos[:, 1:3], torch.zeros(2, 2, 16), rtol=0, atol=0)  # registers: no pos-embed
    native = m.prepare_tokens(torch.randn(1, 3, 224, 224))
    assert native.shape == (1, 1 + 2 + 196, 16)
    assert interpolate_pos_embed(m.pos_embed, (14, 14), style=style) is m.pos_embed


# ------------------------------------------------------------------ init
@pytest.mark.parametrize("style", ["v1", "v2"])
def test_init_statistics(style):
    torch.manual_seed(5)
    m = VisionTransformer(
        img_size=224, patch_size=16, embed_dim=384, depth=1, num_heads=6, style=style, num_register_tokens=4,
        layerscale=0.1 if style == "v2" else 0.0,
    )
    linear = torch.cat([m.blocks[0].attn.qkv.weight.flatten(), m.blocks[0].mlp.fc1.weight.flatten()])
    assert abs(linear.std().item() / 0.02 - 1) < 0.02  # +-2 absolute cut: the std stays 0.02
    assert (linear.abs() > 0.04).float().mean().item() > 0.03  # a +-2 sigma cut would leave none
    assert abs(m.pos_embed.std().item() / 0.02 - 1) < 0.03
    cls_std = 0.02 if style == "v1" else 1e-6
    assert abs(m.cls_token.std().item() / cls_std - 1) < 0.2
    assert abs(m.reg_token.std().item() / 1e-6 - 1) < 0.2
    for name, p in m.named_parameters():
        if name.endswith(".bias") and "patch_embed" not in name:
            assert torch.count_nonzero(p) == 0, name
        if "norm" in name and name.endswith("weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    if style == "v2":
        assert torch.count_nonzero(m.mask_token) == 0 and m.mask_token.shape == (1, 384)
        assert torch.equal(m.blocks[0].ls1.gamma, torch.full((384,), 0.1))
    else:
        assert m.mask_token is None
    # patch conv keeps PyTorch's default (Kaiming-uniform a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert m.patch_embed.proj.weight.abs().max().item() <= bound
    assert abs(m.patch_embed.proj.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.03


# ------------------------------------------------------------------ parameter counts (meta device: no memory, no init cost)
def _count(**kw):
    with torch.device("meta"):
        return sum(p.numel() for p in VisionTransformer(**kw).parameters())


@pytest.mark.parametrize(
    "arch,expected",
    [("vit_tiny", 5_524_416), ("vit_small", 21_665_664), ("vit_base", 85_798_656), ("vit_large", 303_301_632)],
)
def test_parameter_counts_of_standard_v1_backbones(arch, expected):
    # known counts of the /16 ViTs without classifier (timm vit_*_patch16_224, num_classes=0)
    assert _count(patch_size=16, **ARCH_SPECS[arch]) == expected


def test_parameter_count_v2_base_with_registers_layerscale_mask_token():
    d, depth = 768, 12
    expected = 85_798_656 + 4 * d + d + 2 * d * depth  # + registers + mask token + two gammas per block
    assert _count(patch_size=16, style="v2", num_register_tokens=4, layerscale=0.1, **ARCH_SPECS["vit_base"]) == expected


# ------------------------------------------------------------------ stochastic depth wiring
def test_drop_path_schedules_and_modes():
    v1 = tiny_vit(depth=4, drop_path_rate=0.3)
    assert [b.drop_path for b in v1.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert {b.drop_mode for b in v1.blocks} == {"per_sample"}
    v2 = tiny_vit(depth=4, drop_path_rate=0.2, drop_path_uniform=True, style="v2")
    assert [b.drop_path for b in v2.blocks] == [0.2] * 4
    assert {b.drop_mode for b in v2.blocks} == {"batch_subset"}


def test_training_mode_is_stochastic_eval_is_deterministic():
    torch.manual_seed(6)
    m = tiny_vit(drop_path_rate=0.5, drop_path_uniform=True, style="v2", layerscale=0.1)
    x = torch.randn(8, 3, 12, 12)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)


def _cfg(**kw):
    base = dict(arch="vit_tiny", patch_size=4, img_size=28, depth=2, embed_dim=24, num_heads=3)
    base.update(kw)
    return ModelConfig(**base)


def test_build_backbone_student_and_teacher():
    cfg = _cfg(style="v2", drop_path_rate=0.2, drop_path_uniform=True, layerscale=0.1, num_register_tokens=4)
    student, teacher = build_backbone(cfg), build_backbone(cfg, teacher=True)
    assert [b.drop_path for b in student.blocks] == [0.2, 0.2]
    assert [b.drop_path for b in teacher.blocks] == [0.0, 0.0]
    teacher.train()  # even in training mode the teacher is deterministic
    x = torch.randn(4, 3, 28, 28)
    torch.testing.assert_close(teacher(x), teacher(x), rtol=0, atol=0)
    assert student.mask_token is not None and student.reg_token.shape == (1, 4, 24)
    assert student.embed_dim == 24 and len(student.blocks) == 2 and student.num_heads == 3
    assert build_backbone(_cfg(style="v1")).mask_token is None
    assert build_backbone(cfg, attention="math").attention_backend == "math"


def test_build_backbone_honours_mlp_ratio():
    m = build_backbone(_cfg(mlp_ratio=2.0))
    assert m.blocks[0].mlp.fc1.weight.shape == (48, 24)


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_builds(preset):
    cfg = build_config(preset)
    with torch.device("meta"):  # paper-size models: shapes only, no memory
        student = build_backbone(cfg.model)
        teacher = build_backbone(cfg.model, teacher=True, attention=cfg.runtime.attention)
        head = build_head(cfg.head, student.embed_dim, cfg.objective.method)
    spec = ARCH_SPECS[cfg.model.arch]
    assert student.embed_dim == (cfg.model.embed_dim or spec["embed_dim"])
    assert all(b.drop_path == 0.0 for b in teacher.blocks)
    assert (student.mask_token is not None) == (cfg.model.style == "v2")
    assert student.num_register_tokens == cfg.model.num_register_tokens
    protos = cfg.objective.method in ("dino", "dinov2")
    assert head.out_dim == (cfg.head.n_prototypes if protos else cfg.head.bottleneck_dim)


def test_build_backbone_uses_arch_when_not_overridden():
    with torch.device("meta"):
        m = build_backbone(ModelConfig(arch="vit_base", patch_size=16), teacher=True)
    assert m.embed_dim == 768 and len(m.blocks) == 12 and m.num_heads == 12
    assert sum(p.numel() for p in m.parameters()) == 85_798_656


# ------------------------------------------------------------------ attention backend switch
def test_set_attention_backend_math_close_to_sdpa():
    torch.manual_seed(7)
    m = tiny_vit(style="v2", num_register_tokens=4).eval()
    x = torch.randn(2, 3, 28, 28)
    ref = m.forward_features(x)
    m.set_attention_backend("math")
    assert {b.attn.backend for b in m.blocks} == {"math"}
    out = m.forward_features(x)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="valid backends"):
        m.set_attention_backend("xformers")


# ------------------------------------------------------------------ bad input
def test_bad_inputs_are_named():
    m = tiny_vit(style="v2")
    with pytest.raises(ValueError, match="not a positive multiple of the patch size 4"):
        m(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        m(torch.randn(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"masks must be a bool tensor of shape \(B, P\) = \(1, 49\)"):
        m.forward_features(torch.randn(1, 3, 28, 28), torch.zeros(1, 48, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be a bool"):
        m.forward_features(torch.randn(1, 3, 28, 28), torch.zeros(1, 49))
    with pytest.raises(ValueError, match="no mask token"):
        tiny_vit(style="v1").forward_features(torch.randn(1, 3, 28, 28), torch.zeros(1, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown ViT style"):
        tiny_vit(style="v3")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_vit(img_size=30)


# ------------------------------------------------------------------ compile / autocast
def test_traces_under_torch_compile_without_graph_breaks():
    torch.manual_seed(8)
    m = tiny_vit(style="v2", num_register_tokens=4, layerscale=0.1, drop_path_rate=0.1).eval()
    compiled = torch.compile(m.forward_features, backend="eager", fullgraph=True)
    for size in (28, 12):  # the second size re-traces with a freshly interpolated pos-embed
        x = torch.randn(2, 3, size, size)
        masks = torch.rand(2, (size // 4) ** 2) < 0.3
        ref, out = m.forward_features(x, masks), compiled(x, masks)
        for key in ref:
            torch.testing.assert_close(out[key], ref[key])


def test_per_block_compile_shares_graphs_across_drop_path_rates():
    # Regional compile wraps each block; a graph per distinct drop-path rate (v1 linear schedule)
    # would hit dynamo's recompile limit and silently fall back to eager for the later blocks.
    import torch._dynamo

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    try:
        m = tiny_vit(depth=10, drop_path_rate=0.3, style="v1").train()
        for blk in m.blocks:
            blk.compile(backend=counting_backend)
        m(torch.randn(4, 3, 12, 12))
        m(torch.randn(6, 3, 28, 28))
        assert len(graphs) < min(10, torch._dynamo.config.recompile_limit), len(graphs)
    finally:
        torch._dynamo.reset()


def test_bf16_autocast_forward_close_to_fp32():
    torch.manual_seed(9)
    m = tiny_vit(style="v1").eval()
    x = torch.randn(2, 3, 28, 28)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


# ------------------------------------------------------------------ timm key names
def _meta_state(model_fn):
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in model_fn().state_dict().items()}


def test_v1_state_dict_keys_identical_to_timm():
    timm = pytest.importorskip("timm")
    theirs = _meta_state(lambda: timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0))
    ours = _meta_state(lambda: VisionTransformer(patch_size=16, style="v1", **ARCH_SPECS["vit_small"]))
    assert list(ours) == list(theirs)  # same names, same order
    assert ours == theirs  # same shapes


def test_v2_register_keys_match_timm_dinov2_except_pos_embed_and_mask_token():
    timm = pytest.importorskip("timm")
    theirs = _meta_state(lambda: timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0))
    ours = _meta_state(
        lambda: VisionTransformer(
            img_size=518, patch_size=14, style="v2", num_register_tokens=4, layerscale=1e-5, **ARCH_SPECS["vit_small"]
        )
    )
    # timm's dinov2 ViTs keep a patch-only pos_embed (no CLS row) and have no mask token
    assert set(ours) - set(theirs) == {"mask_token"} and set(theirs) <= set(ours)
    assert ours["pos_embed"] == (1, 1 + 37 * 37, 384) and theirs["pos_embed"] == (1, 37 * 37, 384)
    same = [k for k in theirs if k != "pos_embed"]
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    assert any(k.startswith("blocks.11.ls2.gamma") for k in same) and "reg_token" in same


# ------------------------------------------------------------------ GPU: backends inside the model, inductor
def _gpu_backends():
    import importlib.util

    names = ["sdpa", "flash", "cudnn"]
    if importlib.util.find_spec("flash_attn") is not None:
        names.append("flash_attn")
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash", "cudnn", "flash_attn"])
def test_gpu_model_backends_match_math_under_autocast(backend):
    if backend not in _gpu_backends():
        pytest.skip("flash-attn package not installed")
    torch.manual_seed(10)
    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, style="v2",
                          num_register_tokens=4, layerscale=0.1).cuda().eval()
    x = torch.randn(4, 3, 96, 96, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m.set_attention_backend("math")
        ref = m.forward_features(x)
        m.set_attention_backend(backend)
        out = m.forward_features(x)
    for key in ref:
        torch.testing.assert_close(out[key].float(), ref[key].float(), rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_gpu_per_block_inductor_compile_matches_eager(backend):
    torch.manual_seed(11)
    m = VisionTransformer(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, style="v1",
                          drop_path_rate=0.1, attention=backend).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = m(x)
        for blk in m.blocks:
            blk.compile(fullgraph=True)
        out = m(x)
        m.train()
        m(torch.randn(8, 3, 96, 96, device="cuda")).float().square().mean().backward()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None for p in m.blocks.parameters())

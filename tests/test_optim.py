"""Parameter groups (spec 1.5) and clipping semantics (spec 1.6, trap T8)."""
import math

import pytest
import torch
from torch import nn

from flashdino.engine.optim import (apply_schedule, backbone_layer_id, clip_per_module, clip_per_parameter,
                                    drop_last_layer_grads, v1_param_groups, v2_param_groups)


class TinyBackbone(nn.Module):
    def __init__(self, depth=12, d=4):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.reg_token = nn.Parameter(torch.zeros(1, 4, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1 = nn.LayerNorm(d)
            blk.attn = nn.Linear(d, d)
            blk.ls1 = nn.Module()
            blk.ls1.gamma = nn.Parameter(torch.ones(d))
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(d)


class TinyHead(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.mlp = nn.Linear(d, d)
        self.last_layer = nn.Module()
        self.last_layer.weight_g = nn.Parameter(torch.ones(8, 1))
        self.last_layer.weight_v = nn.Parameter(torch.randn(8, d))


def _lookup(groups):
    out = {}
    for g in groups:
        for name in g["names"]:
            out[name] = (g["lr_mult"], g["wd_mult"], g["is_last_layer"])
    return out


def test_v2_multipliers_match_spec_examples():
    groups = _lookup(v2_param_groups(TinyBackbone(), TinyHead(), depth=12))
    assert groups["backbone.patch_embed.proj.weight"][0] == pytest.approx(0.9 ** 13 * 0.2)  # ~0.0508
    assert groups["backbone.pos_embed"][0] == pytest.approx(0.9 ** 13)
    assert groups["backbone.blocks.0.attn.weight"][0] == pytest.approx(0.9 ** 12)
    assert groups["backbone.blocks.11.attn.weight"][0] == pytest.approx(0.9)
    assert groups["backbone.norm.weight"][0] == 1.0 and groups["head.mlp.weight"][0] == 1.0
    # weight decay exclusions by name: .bias, norm, gamma; tokens and pos-embed keep WD
    assert groups["backbone.blocks.3.norm1.weight"][1] == 0.0
    assert groups["backbone.blocks.3.ls1.gamma"][1] == 0.0
    assert groups["backbone.blocks.3.attn.bias"][1] == 0.0
    assert groups["backbone.cls_token"][1] == 1.0 and groups["backbone.mask_token"][1] == 1.0
    # both weight-norm parameters of the prototype layer get WD in the v2 tree
    assert groups["head.last_layer.weight_g"] == (1.0, 1.0, True)
    assert groups["head.last_layer.weight_v"] == (1.0, 1.0, True)


def test_layer_ids():
    assert backbone_layer_id("cls_token", 12) == 0
    assert backbone_layer_id("blocks.5.mlp.fc1.weight", 12) == 6
    assert backbone_layer_id("norm.weight", 12) == 13


def test_v1_groups_exclude_bias_and_1d():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.register_parameter("cls_token", nn.Parameter(torch.zeros(1, 1, 4)))
    groups = v1_param_groups(model.named_parameters())
    by_name = _lookup(groups)
    assert by_name["0.weight"][1] == 1.0 and by_name["cls_token"][1] == 1.0
    assert by_name["0.bias"][1] == 0.0 and by_name["1.weight"][1] == 0.0


def test_apply_schedule_sets_lr_and_wd_per_group():
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    opt = torch.optim.AdamW([
        {"params": [params[0]], "lr_mult": 0.5, "wd_mult": 1.0, "is_last_layer": False},
        {"params": [params[1]], "lr_mult": 1.0, "wd_mult": 0.0, "is_last_layer": False},
        {"params": [params[2]], "lr_mult": 1.0, "wd_mult": 1.0, "is_last_layer": True},
    ])
    apply_schedule(opt, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-3, 0.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.04, 0.0, 0.04]


def test_per_parameter_clipping_is_per_tensor():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 3
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched
    norms = clip_per_parameter([a, b], 3.0)
    assert torch.allclose(norms, torch.tensor([5.0, 0.5]))
    assert a.grad.norm().item() == pytest.approx(3.0 * 5.0 / (5.0 + 1e-6), rel=1e-6)
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4]))
    # the direction of the full gradient changes: that is what distinguishes it from global clipping
    assert not torch.allclose(torch.cat([a.grad, b.grad]) / torch.cat([a.grad, b.grad]).norm(),
                              torch.tensor([3.0, 4.0, 0.0, 0.3, 0.4]) / math.sqrt(25.25))


def test_per_module_clipping_uses_global_norm_per_module():
    m1, m2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    m1.weight.grad = torch.full((2, 2), 3.0)  # norm 6
    m2.weight.grad = torch.full((2, 2), 0.5)  # norm 1
    norms = clip_per_module([m1, m2], 3.0)
    assert [n.item() for n in norms] == pytest.approx([6.0, 1.0])
    assert m1.weight.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(m2.weight.grad, torch.full((2, 2), 0.5))


def test_drop_last_layer_grads():
    head = TinyHead()
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    drop_last_layer_grads(head)
    assert head.last_layer.weight_v.grad is None and head.mlp.weight.grad is not None

"""runtime.activation_checkpointing: the first N student blocks recompute their activations in the
backward. The gradients must not change (bit for bit on the CPU, drop path included: the
recomputation redraws the same samples), the tensors kept for the backward must shrink with N,
and it must compose with both torch.compile modes and packed multi-crop.
"""
import pytest
import torch
import torch._dynamo.config as dynamo_config

from flashdino.engine.config import ConfigError, build_config
from flashdino.engine.models.vit import VisionTransformer
from flashdino.engine.trainer import COMPILE_BACKEND_ENV, Trainer

from test_runtime_compile import TINY, batches


def small_vit(style, depth=3):
    extra = dict(num_register_tokens=2, layerscale=0.1) if style == "v2" else {}
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, style=style,
                             drop_path_rate=0.3, **extra)


def forward_backward(model, crops, packed, seed=11):
    """Loss outputs and every parameter's gradient of one forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same drop-path draws in every run
    if packed:
        outs = model.forward_features_list(crops)
    else:
        outs = [model.forward_features(c) for c in crops]
    loss = sum((o["cls"] ** 2).sum() + o["patch"].square().mean() for o in outs)
    loss.backward()
    # (the mask token gets no gradient without masks)
    return [o["cls"].detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("style", ["v1", "v2"])
@pytest.mark.parametrize("packed", [False, True])
def test_checkpointed_blocks_give_the_same_outputs_and_gradients(style, packed):
    model = small_vit(style).train()
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)]
    ref_out, ref_grad = forward_backward(model, crops, packed)
    for n in (1, 3):
        model.set_activation_checkpointing(n)
        out, grad = forward_backward(model, crops, packed)
        assert all(torch.equal(a, b) for a, b in zip(ref_out, out)), n
        assert ref_grad.keys() == grad.keys()
        for name in ref_grad:
            assert torch.equal(ref_grad[name], grad[name]), (n, name)


def saved_bytes(model, x):
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_features(x)
    return sum(storages.values())


def test_what_autograd_keeps_shrinks_with_each_checkpointed_block():
    model = small_vit("v1", depth=4).train()
    x = torch.randn(8, 3, 32, 32)
    kept = []
    for n in range(5):
        model.set_activation_checkpointing(n)
        kept.append(saved_bytes(model, x))
    assert all(a > b for a, b in zip(kept, kept[1:])), kept
    # the blocks hold most of a ViT's activations: with all four recomputed little is left
    assert kept[-1] < kept[0] / 4, kept


def test_evaluation_and_bad_counts():
    model = small_vit("v1").eval()
    model.set_activation_checkpointing(3)
    with torch.no_grad():
        assert saved_bytes(model, torch.randn(2, 3, 32, 32)) == 0
    with pytest.raises(ValueError, match="this ViT has 3"):
        model.set_activation_checkpointing(4)
    with pytest.raises(ConfigError, match="must be >= 0"):
        build_config("simdino_vits16", overrides=["runtime.activation_checkpointing=-1"])
    cfg = build_config("simdino_vits16", overrides=TINY + ["runtime.activation_checkpointing=3"])
    with pytest.raises(ConfigError, match="the student has 2"):
        Trainer(cfg)


def run_steps(trainer, data):
    out = []
    for k, batch in enumerate(data):
        dynamo_config.error_on_recompile = k > 0
        try:
            losses = trainer.train_step(batch)
        finally:
            dynamo_config.error_on_recompile = False
        trainer.state.step += 1
        out.append({n: v.detach().clone() for n, v in losses.items() if n.endswith("loss")})
    return out


@pytest.mark.parametrize("compile_mode,multicrop", [("none", "grouped"), ("block", "packed"), ("full", "grouped")])
def test_training_steps_with_checkpointed_blocks_equal_the_plain_eager_steps(tmp_path, monkeypatch, compile_mode,
                                                                              multicrop):
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    torch._dynamo.reset()
    common = ["model.drop_path_rate=0.2", "train.seed=3", f"train.output_dir={tmp_path}"]
    plain = Trainer(build_config("simdinov2_vitb16", overrides=TINY + common))
    checkpointed = Trainer(build_config("simdinov2_vitb16", overrides=TINY + common + [
        "runtime.activation_checkpointing=2", f"runtime.compile={compile_mode}", f"runtime.multicrop={multicrop}"]))
    assert checkpointed.model.student["backbone"].checkpoint_blocks == 2
    assert checkpointed.model.teacher["backbone"].checkpoint_blocks == 0  # no backward, nothing to recompute
    data = batches(plain, 3)
    torch.manual_seed(5)
    ref = run_steps(plain, data)
    torch.manual_seed(5)
    got = run_steps(checkpointed, data)
    if compile_mode != "none":
        report = checkpointed.compile_report
        assert report.graph_breaks == 0 and checkpointed.recompiles_after_warmup == 0, report.summary()
    exact = compile_mode == "none"  # compiled graphs may order float operations differently
    for a, b in zip(ref, got):
        for name in a:
            if exact:
                assert torch.equal(a[name], b[name]), name
            else:
                torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(plain.model.student.named_parameters(), checkpointed.model.student.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()

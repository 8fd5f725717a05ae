"""Evaluation transform and streamed feature extraction (spec 5)."""
import numpy as np
import pytest
import torch
from PIL import Image

from flashdino.engine.eval.features import (EvalTransform, cls_features, extract_features, iterate_batches,
                                            multi_block_features, raw_pixel_features)
from flashdino.engine.models import VisionTransformer
from flashdino.pipelines.datasets import CorruptImageError


class ArrayReader:
    """A Fashion-MNIST-like reader: uint8 pixels in .images, PIL images from load()."""

    def __init__(self, n=37, size=28, rgb=False, broken=()):
        shape = (n, size, size, 3) if rgb else (n, size, size)
        self.images = np.random.randint(0, 256, size=shape, dtype=np.uint8)
        self.labels = np.random.randint(0, 5, size=n).astype(np.int64)
        self.broken = set(broken)

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if i in self.broken:
            raise CorruptImageError(self.path(i), "test: truncated")
        return Image.fromarray(self.images[i]).convert("RGB"), int(self.labels[i])

    def path(self, i):
        return f"array://{i}"


class PilOnly(ArrayReader):
    """The same images without the array fast path."""

    def __init__(self, base):
        self.base = base
        self.labels = base.labels
        self.broken = base.broken

    def load(self, i):
        return self.base.load(i)


def _tiny_vit(**kw):
    args = dict(img_size=28, patch_size=7, embed_dim=24, depth=3, num_heads=2)
    args.update(kw)
    return VisionTransformer(**args).eval()


def test_eval_transform_equals_torchvision():
    from torchvision import transforms as T

    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    img = Image.fromarray(np.random.randint(0, 256, size=(51, 70, 3), dtype=np.uint8))
    reference = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(mean, std)])
    ours = EvalTransform(32, 40, mean, std)(img)
    torch.testing.assert_close(ours, reference(img), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rgb", [False, True])
def test_array_fast_path_equals_pil_path(rgb):
    reader = ArrayReader(rgb=rgb)
    tf = EvalTransform(28, 28, (0.3, 0.3, 0.3), (0.35, 0.35, 0.35))
    fast = list(iterate_batches(reader, tf, batch_size=10))
    slow = list(iterate_batches(PilOnly(reader), tf, batch_size=10))
    assert len(fast) == len(slow) == 4
    for (a, la, oka), (b, lb, okb) in zip(fast, slow):
        assert torch.equal(a, b) and torch.equal(la, lb) and oka.all() and okb.all()


def test_extract_features_streams_in_order_and_normalizes(tmp_path):
    reader = ArrayReader(n=23)
    tf = EvalTransform(28, 28)
    model = _tiny_vit()
    out = extract_features(model, reader, tf, batch_size=5, normalize=True, out_path=str(tmp_path / "f.npy"))
    images = torch.cat([b[0] for b in iterate_batches(reader, tf, batch_size=100)])
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.forward_features(images)["cls"], dim=1)
    torch.testing.assert_close(out.features, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.labels, torch.from_numpy(reader.labels)) and torch.equal(out.indices, torch.arange(23))
    on_disk = np.load(tmp_path / "f.npy")
    np.testing.assert_array_equal(on_disk, out.features.numpy())


@pytest.mark.parametrize("on_disk", [False, True])
def test_undecodable_images_are_left_out_and_counted(capsys, tmp_path, on_disk):
    base = ArrayReader(n=12, broken=(3, 7))
    model, tf = _tiny_vit(), EvalTransform(28, 28)
    path = str(tmp_path / "f.npy") if on_disk else None
    out = extract_features(model, PilOnly(base), tf, batch_size=4, out_path=path)
    assert len(out) == 10 and out.failed_paths == ["array://3", "array://7"]
    kept = [i for i in range(12) if i not in (3, 7)]
    assert out.indices.tolist() == kept and out.labels.tolist() == base.labels[kept].tolist()
    base.broken = set()
    full = extract_features(model, PilOnly(base), tf, batch_size=4)
    torch.testing.assert_close(out.features, full.features[kept], rtol=0, atol=0)  # rows moved, not recomputed
    assert "2 image(s) could not be decoded" in capsys.readouterr().err


def test_multi_block_features_layout_excludes_registers():
    model = _tiny_vit(num_register_tokens=4, style="v2")
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        got = multi_block_features(2, avgpool=True)(model, x)
        layers = model.get_intermediate_layers(x, 2, norm=True)
    want = torch.cat([layers[0][:, 0], layers[1][:, 0], layers[1][:, 5:].mean(1)], dim=1)
    assert got.shape == (3, 3 * 24)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[:, 24:48], cls_features(model, x))  # last block's CLS = the k-NN feature


def test_raw_pixels_are_per_image_centred_single_channel():
    reader = ArrayReader(n=9)
    tf = EvalTransform(28, 28, (0.5,) * 3, (0.25,) * 3)
    feats = raw_pixel_features(reader, tf).features
    x = (reader.images.reshape(9, -1).astype(np.float64) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(feats.numpy(), x - x.mean(1, keepdims=True), rtol=0, atol=1e-5)


def test_random_init_backbone_is_the_runs_initialization(tmp_path):
    from flashdino.engine.config import build_config
    from flashdino.engine.eval.backbone import random_init_backbone
    from flashdino.engine.trainer import Trainer

    cfg = build_config(None, None, [
        "data.dataset=synthetic", "data.synthetic_size=16", "data.batch_size=8", "data.num_workers=0",
        "model.img_size=32", "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "crops.global_size=32",
        "crops.local_size=16", "crops.n_local=1", "head.hidden_dim=16", "head.bottleneck_dim=8", "train.seed=5",
        f"train.output_dir={tmp_path}", "log.tensorboard=false", "log.progress_bar=false"])
    trainer = Trainer(cfg)
    ours = random_init_backbone(cfg).state_dict()
    theirs = trainer.model.student["backbone"].state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_fp32_extraction_runs_a_half_only_attention_model_with_sdpa(backend):
    # A run trained with runtime.attention=flash hands its teacher to the fp32 k-NN after training;
    # those kernels raise on fp32 input, so extraction switches to SDPA and back.
    reader, tf = ArrayReader(n=9), EvalTransform(28, 28)
    model = _tiny_vit()
    want = extract_features(model, reader, tf, batch_size=4).features
    model.set_attention_backend(backend)
    got = extract_features(model, reader, tf, batch_size=4).features
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert model.attention_backend == backend  # restored
    from flashdino.engine.eval.backbone import prepared_for_eval

    with prepared_for_eval(model, torch.bfloat16):  # half autocast: the kernel stays
        assert model.attention_backend == backend
    with pytest.raises(RuntimeError, match="needs fp16/bf16 CUDA tensors"):  # the case it protects from
        model.forward_features(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("size, resize, expected", [
    (None, None, (224, 256)),  # the run's eval settings
    (224, None, (224, 256)),  # a crop size alone keeps the 256/224 ratio: the center crop is not dropped
    (112, None, (112, 128)),
    (224, 224, (224, 224)),  # both given: exactly as asked
])
def test_transform_from_config_keeps_the_resize_ratio(size, resize, expected):
    from flashdino.engine.config import build_config

    cfg = build_config("dino_vits16")
    assert (cfg.eval.eval_size, cfg.eval.resize_size) == (224, 256)
    tf = EvalTransform.from_config(cfg, size, resize)
    assert (tf.size, tf.resize_size) == expected

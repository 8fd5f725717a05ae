"""End-of-run plots: loss curves and last-layer CLS attention maps."""
import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from flashdino.engine.models import VisionTransformer  # noqa: E402
from flashdino.engine.plots import cls_attention, curve_keys, pick_images, plot_attention_maps, plot_loss_curves  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    from PIL import Image

    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    with Image.open(path) as img:
        return img.size


def test_loss_curves_png(tmp_path):
    records = [{"step": s, "total_loss": -s / 10, "comp_loss": 0.5, "expa_loss": 0.1 * s, "lr": 1e-3, "epoch": 0}
               for s in range(1, 40)]
    records.insert(5, {"step": 5, "collapse/effective_rank": 12.0, "collapse/std_ratio": 0.7})
    assert curve_keys(records) == ["total_loss", "comp_loss", "expa_loss", "lr", "collapse/effective_rank",
                                   "collapse/std_ratio"]
    w, h = _png_size(plot_loss_curves(records, str(tmp_path / "curves.png"), title="t"))
    assert w > 400 and h > 300
    with pytest.raises(ValueError, match="no loss term"):
        plot_loss_curves([{"step": 1, "lr": 0.1}], str(tmp_path / "x.png"))


def test_cls_attention_is_the_cls_row_over_patches_without_registers():
    model = VisionTransformer(img_size=28, patch_size=7, embed_dim=24, depth=2, num_heads=3, style="v2",
                              num_register_tokens=2).eval()
    x = torch.randn(2, 3, 28, 28)
    maps = cls_attention(model, x)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)  # (2, 3, 1 + 2 + 16, same)
    assert maps.shape == (2, 3, 4, 4)
    torch.testing.assert_close(maps.flatten(2), attn[:, :, 0, 3:])
    # patch (r, c) is token 3 + 4 r + c: row-major grid
    torch.testing.assert_close(maps[1, 2, 2, 1], attn[1, 2, 0, 3 + 4 * 2 + 1])


def test_attention_maps_png(tmp_path):
    model = VisionTransformer(img_size=28, patch_size=4, embed_dim=24, depth=1, num_heads=3)
    model.train()
    images = torch.randn(4, 3, 28, 28)
    path = plot_attention_maps(model, images, str(tmp_path / "attn.png"), (0.3,) * 3, (0.3,) * 3, max_heads=2)
    w, h = _png_size(path)
    assert w > 100 and h > 100
    assert model.training  # mode restored


def test_pick_images_one_per_class_first():
    class R:
        labels = np.array([3, 3, 1, 0, 1, 2, 0])

        def __len__(self):
            return 7

    assert pick_images(R(), 3) == [3, 2, 0]  # first image of classes 0, 1, 2
    assert len(set(pick_images(R(), 6))) == 6


def test_attention_maps_of_a_half_only_attention_model(tmp_path):
    model = VisionTransformer(img_size=28, patch_size=4, embed_dim=24, depth=2, num_heads=3)
    model.set_attention_backend("flash")
    path = plot_attention_maps(model, torch.randn(2, 3, 28, 28), str(tmp_path / "attn.png"), (0.3,) * 3, (0.3,) * 3)
    assert _png_size(path)[0] > 100 and model.attention_backend == "flash"

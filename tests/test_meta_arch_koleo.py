"""KoLeo in the training objective: the weighted term on the student backbone CLS of each global
crop (spec 4.2) joins the total of DINOv2 and of SimDINOv2 (spec 3.6: weight 0 by default there,
but a set weight must not be dropped silently)."""

import numpy as np
import pytest
import torch

from flashdino.engine.config import build_config
from flashdino.engine.meta_arch import SSLMetaArch
from flashdino.pipelines.masking import mask_indices_and_weights

B, SIZE, LOCAL = 4, 32, 16
TINY_V2 = [
    "model.arch=vit_tiny", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
    f"model.img_size={SIZE}", "model.drop_path_rate=0.0", "head.hidden_dim=64", "head.bottleneck_dim=16",
    f"crops.global_size={SIZE}", f"crops.local_size={LOCAL}", "crops.n_local=2", f"data.batch_size={B}",
    "runtime.compile=none", "train.precision=fp32",
    # DINOv2's layerscale 1e-5 makes all CLS rows at init nearly equal, and KoLeo's log of their
    # ~1e-6 distances in fp32 is then ill-conditioned; 0.1 keeps the rows apart.
    "model.layerscale=0.1",
]


def np_koleo(x):
    """Spec 4.2 in float64: normalize (1e-8), nearest other row by cosine, -mean log(distance)."""
    x = np.asarray(x, np.float64)
    xh = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    sim = xh @ xh.T
    np.fill_diagonal(sim, -np.inf)
    nearest = sim.argmax(axis=1)
    d = np.linalg.norm(xh - xh[nearest] + 1e-8, axis=1)
    return -np.mean(np.log(d + 1e-8))


def _batch(gen):
    masks = torch.rand(2 * B, (SIZE // 8) ** 2, generator=gen) < 0.4
    masks[B:] = False  # half of the global crops carry a mask, as the collate makes them
    idx, weights = mask_indices_and_weights(masks)
    return {
        "global_crops": torch.randn(2 * B, 3, SIZE, SIZE, generator=gen),
        "local_crops": torch.randn(2 * B, 3, LOCAL, LOCAL, generator=gen),
        "masks": masks, "mask_indices": idx, "mask_weights": weights,
    }


def _loss(preset, koleo_weight, batch, extra):
    cfg = build_config(preset, overrides=TINY_V2 + extra + [f"objective.koleo_weight={koleo_weight}"])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).train()
    out = model(batch)
    with torch.no_grad():
        cls = model.student["backbone"].forward_features(batch["global_crops"], masks=batch["masks"])["cls"]
    return out, cls


@pytest.mark.parametrize("preset, extra", [
    ("simdinov2_vitb16", ["runtime.kernels.coding_rate=eager"]),
    ("dinov2_vitb16", ["head.n_prototypes=64", "runtime.kernels.centering=eager"]),
])
def test_koleo_weight_adds_the_spec_term(preset, extra):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    batch = _batch(gen)
    without, _ = _loss(preset, 0.0, batch, extra)
    with_koleo, cls = _loss(preset, 0.1, batch, extra)
    assert "koleo_loss" not in without
    expected = 0.1 * (np_koleo(cls[:B].numpy()) + np_koleo(cls[B:].numpy()))
    # The engine computes KoLeo in fp32 (spec 4.2), where the log of nearest-neighbour distances
    # loses a few more digits than a plain fp32 sum: 1e-4 relative, measured error ~1e-5.
    np.testing.assert_allclose(with_koleo["koleo_loss"].item(), expected, rtol=1e-4)
    np.testing.assert_allclose(
        with_koleo["total_loss"].item() - without["total_loss"].item(), expected, rtol=1e-4, atol=1e-6)
    assert with_koleo["total_loss"].requires_grad

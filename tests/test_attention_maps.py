"""Attention maps: the reference's 60 %-mass masks on hand-made attention, upsampling, Jaccard scores, PNG
rendering, and a run of a tiny ViT on davis-mini frames (shapes and ranges only: random weights)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dino_model.eval.attention_maps import (
    analyze_image,
    attention_masks,
    cls_attention,
    davis_attention_scores,
    jaccard,
    jaccard_scores,
    render_png,
    upsample_nearest,
)
from dino_model.models import build_backbone


def test_mask_keeps_top_60_percent_mass():
    # sorted ascending: .1 .2 .3 .4 -> cumsum .1 .3 .6 1.0 -> > 0.4 keeps .3 and .4 (holding 70 %)
    attn = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    assert attention_masks(attn).tolist() == [[True, False, True, False]]
    # unnormalised weights give the same mask (the reference normalises after sorting)
    assert attention_masks(attn * 7).tolist() == [[True, False, True, False]]


def test_mask_threshold_is_strict_and_per_head():
    # exact binary fractions: sorted .125 .125 .25 .5, cumsum .125 .25 .5 1
    head0 = torch.tensor([0.25, 0.125, 0.125, 0.5])
    head1 = torch.tensor([0.5, 0.25, 0.125, 0.125])
    attn = torch.stack([head0, head1]).reshape(2, 2, 2)
    # threshold .75 -> keep cumsum > .25: the .125 whose cumsum is exactly .25 is dropped
    m = attention_masks(attn, threshold=0.75)
    assert m.shape == (2, 2, 2)
    assert m.reshape(2, 4).tolist() == [[True, False, False, True], [True, True, False, False]]
    # threshold .6 (default) -> keep cumsum > .4: only .5 and .25 stay
    assert attention_masks(attn).reshape(2, 4).tolist() == [[True, False, False, True], [True, True, False, False]]
    # threshold 1 keeps everything with positive mass
    assert attention_masks(attn, 1.0).all()
    # ties: with a stable sort, the lower patch index is "smaller"; 4 equal weights: cumsum .25 .5 .75 1 -> > .4
    # keeps the 3 highest-ranked = patch indices 1, 2, 3
    assert attention_masks(torch.ones(1, 4)).tolist() == [[False, True, True, True]]
    with pytest.raises(ValueError, match="threshold"):
        attention_masks(attn, 0.0)


def test_upsample_nearest_and_jaccard():
    m = torch.tensor([[[True, False], [False, True]]])
    up = upsample_nearest(m, 3)
    assert up.shape == (1, 6, 6) and up.dtype == torch.bool
    assert up[0, :3, :3].all() and not up[0, :3, 3:].any() and up[0, 3:, 3:].all()
    assert jaccard(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(1 / 3)
    assert jaccard(np.zeros(4), np.zeros(4)) == 1.0
    assert jaccard(np.ones(4), np.zeros(4)) == 0.0
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    s = jaccard_scores(masks, np.array([1, 1, 1, 0]))
    # head 0: 2/3, head 1: 1/4, head 2: 1/3, union = all four pixels: 3/4
    assert s.per_head == pytest.approx([2 / 3, 1 / 4, 1 / 3])
    assert s.best_head == 0 and s.best == pytest.approx(2 / 3)
    assert s.mean == pytest.approx((2 / 3 + 1 / 4 + 1 / 3) / 3)
    assert s.union == pytest.approx(3 / 4)
    assert s.as_dict()["jaccard_union_heads"] == pytest.approx(0.75)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=16).eval()


def test_cls_attention_is_a_distribution_slice(backbone):
    x = torch.randn(2, 3, 48, 64)
    a = cls_attention(backbone, x)
    assert a.shape == (2, 3, 3, 4)
    full = backbone.get_last_selfattention(x)
    assert torch.allclose(a.sum(dim=(2, 3)) + full[:, :, 0, 0], torch.ones(2, 3), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        cls_attention(backbone, torch.randn(1, 3, 50, 64))


def test_analyze_and_render(backbone):
    img = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    fg = np.zeros((70, 90), bool)
    fg[10:40, 20:60] = True
    res = analyze_image(backbone, img, fg, size=None)
    # 70x90 cropped to the patch grid: 64x80
    assert res.image.shape == (3, 64, 80) and res.masks.shape == (3, 64, 80) and res.attention.shape == (3, 64, 80)
    assert res.foreground.shape == (64, 80) and res.foreground.sum() == 30 * 40
    assert 0.0 <= res.scores.best <= 1.0 and 0.0 <= res.scores.union <= 1.0
    assert res.scores.best == max(res.scores.per_head)
    # each head keeps at least one patch and the masks are constant within each 16x16 patch
    for m in res.masks:
        assert m.any() and torch.equal(m, upsample_nearest(m[::16, ::16][None], 16)[0])
    png = render_png(res)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (80 * 6, 64 * 2)  # image + 3 heads + union + foreground
    with pytest.raises(ValueError, match="sizes differ"):
        analyze_image(backbone, img, fg[:10], size=None)


def test_davis_mini_attention_scores(backbone, shared_data):
    res = davis_attention_scores(backbone, shared_data / "davis-mini", frame_step=20, max_frames=21, size=64)
    assert {s for s, _, _ in res.frames} == {"car-shadow", "motocross-jump", "kite-surf"}
    assert len(res.frames) == 6  # frames 0 and 20 of each sequence
    for v in (res.best_head, res.mean_heads, res.union_heads):
        assert 0.0 <= v <= 1.0
    assert res.best_head >= res.mean_heads
    assert set(res.overlays) == {"car-shadow", "motocross-jump", "kite-surf"}
    assert Image.open(io.BytesIO(res.overlays["kite-surf"])).format == "PNG"

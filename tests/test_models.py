"""Backbones (reference position-embedding interpolation, attention, intermediate layers), head, multi-crop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from dino_model.models import DINOHead, MultiCropWrapper, build_backbone, convert_reference_head_state_dict


def reference_interpolate(pos_embed: torch.Tensor, patch: int, w: int, h: int) -> torch.Tensor:
    """facebookresearch/dino vision_transformer.py interpolate_pos_encoding, written out (square/same-grid
    shortcut excluded: callers use a different grid)."""
    N = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)), mode="bicubic")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((pos_embed[:, :1], grid), dim=1)


def manual_forward(model, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """ViT forward with the given position embedding: conv patches, [CLS], blocks, final norm."""
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1) + pos
    for blk in model.blocks:
        tokens = blk(tokens)
    return model.norm(tokens)[:, 0]


@pytest.fixture(scope="module")
def tiny8():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=8, img_size=32).eval()


def test_unknown_arch_names_the_field():
    with pytest.raises(ValueError, match="arch"):
        build_backbone("vit_giant")


def test_vit_attributes_and_output_shape(tiny8):
    assert (tiny8.embed_dim, tiny8.patch_size, tiny8.num_heads) == (192, 8, 3)
    assert tiny8.pos_embed.shape == (1, 16 + 1, 192)
    assert tiny8(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    vit_s = build_backbone("vit_small", patch_size=16)
    assert (vit_s.embed_dim, vit_s.num_heads, vit_s.pos_embed.shape[1]) == (384, 6, 197)


def test_pos_embed_interpolation_matches_reference_at_96px():
    torch.manual_seed(1)
    model = build_backbone("vit_tiny", patch_size=16, img_size=224).eval()
    x = torch.randn(1, 3, 96, 96)
    tokens = torch.zeros(1, 36 + 1, 192)
    ours = model.interpolate_pos_encoding(tokens, 96, 96)
    ref = reference_interpolate(model.pos_embed, 16, 96, 96)
    assert ours.shape == (1, 37, 192)
    assert torch.equal(ours, ref)
    with torch.no_grad():
        assert torch.allclose(model(x), manual_forward(model, x, ref), atol=1e-6)
        # timm's own resizing (antialiased, exact size) is a different function: the reason we don't use it.
        timm_pos = resample_abs_pos_embed(model.pos_embed, new_size=(6, 6), old_size=(14, 14), num_prefix_tokens=1)
    assert not torch.allclose(timm_pos, ref, atol=1e-6)


def test_pos_embed_interpolation_matches_reference_non_square(tiny8):
    x = torch.randn(2, 3, 32, 48)  # grid 4 x 6; the reference calls dim 2 "w" and dim 3 "h"
    tokens = torch.zeros(2, 24 + 1, 192)
    ours = tiny8.interpolate_pos_encoding(tokens, 32, 48)
    ref = reference_interpolate(tiny8.pos_embed, 8, 32, 48)
    assert ours.shape == (1, 25, 192)
    assert torch.equal(ours, ref)
    with torch.no_grad():
        assert torch.allclose(tiny8(x), manual_forward(tiny8, x, ref), atol=1e-6)


def test_same_square_grid_uses_pos_embed_unchanged(tiny8):
    assert tiny8.interpolate_pos_encoding(torch.zeros(1, 17, 192), 32, 32) is tiny8.pos_embed


def test_non_multiple_input_is_cropped_to_the_patch_grid(tiny8):
    x = torch.randn(1, 3, 37, 30)
    with torch.no_grad():
        assert torch.allclose(tiny8(x), tiny8(x[:, :, :32, :24]), atol=1e-6)


def test_last_selfattention_rows_sum_to_one_and_match_hand_computation(tiny8):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        attn = tiny8.get_last_selfattention(x)
        assert attn.shape == (2, 3, 17, 17)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 3, 17), atol=1e-5)
        tokens = tiny8.prepare_tokens(x)
        for blk in tiny8.blocks[:-1]:
            tokens = blk(tokens)
        last = tiny8.blocks[-1]
        qkv = last.attn.qkv(last.norm1(tokens)).reshape(2, 17, 3, 3, 64)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1)  # head_dim 64 -> scale 1/8
    assert torch.allclose(attn, expected, atol=1e-5)


def test_sdpa_path_equals_explicit_attention_path(tiny8):
    attn_module = tiny8.blocks[0].attn
    x = torch.randn(2, 17, 192)
    with torch.no_grad():
        fused = attn_module(x)
        explicit, weights = attn_module.forward_with_attention(x)
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert weights.shape == (2, 3, 17, 17)


def test_intermediate_layers_are_normed_block_outputs(tiny8):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = tiny8.get_intermediate_layers(x, n=2)
        tokens = tiny8.prepare_tokens(x)
        for blk in tiny8.blocks[:-1]:
            tokens = blk(tokens)
        second_last = tiny8.norm(tokens)
    assert len(layers) == 2 and layers[0].shape == (2, 17, 192)
    assert torch.allclose(layers[0], second_last, atol=1e-6)
    assert torch.allclose(layers[1][:, 0], tiny8(x), atol=1e-6)


def test_resnet50_backbone():
    model = build_backbone("resnet50").eval()
    assert model.embed_dim == 2048
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


def test_head_init_and_weight_norm_gain_frozen():
    torch.manual_seed(0)
    head = DINOHead(192, out_dim=64, hidden_dim=2048, bottleneck_dim=32)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 192), (2048, 2048), (32, 2048)]
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    big = linears[1].weight
    # trunc_normal_(std=0.02) truncates at absolute +-2 (as the reference): effectively N(0, 0.02).
    assert abs(big.std().item() - 0.02) < 4e-4 and abs(big.mean().item()) < 4e-4
    assert torch.equal(head.last_layer.weight_g, torch.ones(64, 1))
    assert not head.last_layer.weight_g.requires_grad
    assert head.last_layer.weight_v.requires_grad
    assert set(head.state_dict()) >= {"last_layer.weight_g", "last_layer.weight_v"}
    assert "last_layer.bias" not in head.state_dict()
    # Every prototype has norm g = 1.
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(64), atol=1e-6)
    assert DINOHead(192, out_dim=64, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_head_forward_by_hand():
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.copy_(torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.5]]))
    x = torch.randn(3, 8)
    l1, _, l2, _, l3 = head.mlp
    h = l3(F.gelu(l2(F.gelu(l1(x)))))
    h = h / h.norm(dim=1, keepdim=True)
    v = head.last_layer.weight_v
    w = head.last_layer.weight_g * v / v.norm(dim=1, keepdim=True)
    assert torch.allclose(head(x), h @ w.T, atol=1e-6)
    # The gain receives gradients when not frozen.
    head(x).sum().backward()
    assert head.last_layer.weight_g.grad is not None


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_head_loads_reference_weight_norm_layouts():
    torch.manual_seed(0)
    ref_last = nn.utils.weight_norm(nn.Linear(4, 6, bias=False))  # the reference's layer (old API)
    with torch.no_grad():
        ref_last.weight_g.uniform_(0.5, 2.0)
    head = DINOHead(8, out_dim=6, hidden_dim=16, bottleneck_dim=4)
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer")}
    sd["last_layer.weight_g"] = ref_last.weight_g.detach().clone()
    sd["last_layer.weight_v"] = ref_last.weight_v.detach().clone()
    head.load_state_dict(convert_reference_head_state_dict(sd))
    z = F.normalize(torch.randn(3, 4), dim=-1)
    assert torch.allclose(head.last_layer(z), ref_last(z), atol=1e-6)

    para = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6, bias=False))
    psd = {k: v for k, v in sd.items() if not k.startswith("last_layer")}
    psd.update({f"last_layer.{k}": v for k, v in para.state_dict().items()})
    head.load_state_dict(convert_reference_head_state_dict(psd))
    assert torch.allclose(head.last_layer(z), para(z), atol=1e-6)

    del sd["last_layer.weight_v"]
    with pytest.raises(ValueError, match="incomplete"):
        convert_reference_head_state_dict(sd)


def test_multicrop_wrapper_equals_per_crop_forward_with_two_backbone_calls(tiny8):
    torch.manual_seed(0)
    head = DINOHead(192, out_dim=16, hidden_dim=32, bottleneck_dim=8)
    wrapper = MultiCropWrapper(tiny8, head).eval()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16),
             torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
    calls = []
    handle = tiny8.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            out = wrapper(crops)
    finally:
        handle.remove()
    assert calls == [4, 6]
    with torch.no_grad():
        per_crop = torch.cat([head(tiny8(c)) for c in crops])
    assert out.shape == (10, 16)
    assert torch.allclose(out, per_crop, atol=1e-5)


def test_state_dict_loads_into_timm_vit_with_identical_output():
    import timm

    torch.manual_seed(0)
    ours = build_backbone("vit_tiny", patch_size=16, img_size=224).eval()
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)

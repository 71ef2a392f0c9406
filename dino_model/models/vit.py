"""Vision Transformer backbones for DINO, built from timm's blocks but behaving like the reference.

Why not `timm.create_model("vit_small_patch16_224", dynamic_img_size=True)`: timm resizes the position
embeddings to the exact token grid with antialiasing, while the reference DINO implementation
(facebookresearch/dino, `vision_transformer.py`) interpolates bicubically, without antialiasing, by the scale
factor ``((w // p + 0.1) / sqrt(N), (h // p + 0.1) / sqrt(N))``.  At 96 px the two differ by up to 0.08, so
multi-crop training and evaluation would not match the paper.  Here only the token preparation is ours; the
parameters (and therefore the state_dict keys) are exactly timm's `VisionTransformer` ones, which are also the
reference's names (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}.*`, `norm.*`).  Exported teacher weights therefore load with
`timm.create_model("vit_small_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=PATH),
num_classes=0)` and reference checkpoints load after stripping their `module.backbone.` / `backbone.` prefix.

Attention runs through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU); the explicit
softmax is computed only when the attention map is requested (`get_last_selfattention`).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# name -> (embed_dim, depth, num_heads); the reference's vit_tiny / vit_small / vit_base.
VIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


class DinoAttention(Attention):
    """timm's multi-head self-attention, always fused in `forward`, with an explicit path that returns weights."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # timm decides fused vs explicit from an environment variable; training speed must not depend on it.
        self.fused_attn = True

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _project(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if self.gate is not None:
            out = out * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(out))

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
        )
        return self._project(x, out)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same output as `forward` (up to float rounding) plus the softmax weights [B, heads, N, N]."""
        q, k, v = self._qkv(x)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = self.attn_drop(attn) @ v
        return self._project(x, out), attn


class DinoVisionTransformer(VisionTransformer):
    """timm `VisionTransformer` (no classifier) with the reference DINO token preparation and accessors.

    `forward(x) -> [B, D]` is the [CLS] token after the final LayerNorm.  Inputs of any size work: the patch
    convolution drops the pixels beyond the last full patch (as the reference does) and the position
    embeddings are interpolated by `interpolate_pos_encoding`.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, drop_path_rate: float = 0.0) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            attn_layer=DinoAttention,
        )
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.depth = depth
        # The reference initialises the class token like the position embedding (timm uses normal(1e-6)).
        trunc_normal_(self.cls_token, std=0.02)

    # -- tokens -------------------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """Position embeddings for tokens `x` [B, npatch+1, D] of an input whose `x.shape[2:] == (w, h)`.

        Exactly the reference: no change when the grid matches and the input is square; otherwise the patch
        embeddings (a sqrt(N) x sqrt(N) grid) are resized with bicubic interpolation (align_corners=False, no
        antialiasing) by scale factor ((w // p + 0.1) / sqrt(N), (h // p + 0.1) / sqrt(N)).  The +0.1 avoids
        floating point floor errors (reference issue #8); the output grid is then (w // p, h // p).
        Like the reference, `w` is the height dimension (dim 2) and `h` the width (dim 3) of the image.
        """
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size + 0.1
        h0 = h // self.patch_size + 0.1
        side = int(math.sqrt(N))
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
            align_corners=False,
        )
        if int(w0) != patch_pos_embed.shape[-2] or int(h0) != patch_pos_embed.shape[-1]:
            raise RuntimeError(
                f"position-embedding interpolation produced grid {tuple(patch_pos_embed.shape[-2:])}, "
                f"expected {(int(w0), int(h0))}"
            )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + [CLS] + interpolated position embedding -> [B, N+1, D]."""
        B, _, w, h = x.shape
        # Call the convolution directly: timm's PatchEmbed asserts divisibility, the reference crops instead.
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = self.patch_embed.norm(x)
        # Under autocast the conv output is low precision; like the reference, concatenating with the fp32
        # class token promotes the residual stream to fp32 (the blocks' matmuls still run in low precision).
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    # -- outputs ------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [B, N+1, D]."""
        x = self.prepare_tokens(x)
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block: [B, num_heads, N+1, N+1] (rows sum to 1)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        _, attn = last.attn.forward_with_attention(last.norm1(x))
        return attn

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:  # type: ignore[override]
        """Outputs of the last `n` blocks, each through the final norm: list of [B, N+1, D] (reference API)."""
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


def vit(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0, img_size: int = 224) -> DinoVisionTransformer:
    """Build `arch` in VIT_CONFIGS with randomly initialised weights (never downloads anything)."""
    embed_dim, depth, num_heads = VIT_CONFIGS[arch]
    return DinoVisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                 num_heads=num_heads, drop_path_rate=drop_path_rate)

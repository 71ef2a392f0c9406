"""Backbones (ViT-tiny/small/base, ResNet-50), the DINO head and the multi-crop wrapper."""

from __future__ import annotations

from torch import nn

from dino_model.models.head import DINOHead, WeightNormLinear, convert_reference_head_state_dict
from dino_model.models.multicrop import MultiCropWrapper
from dino_model.models.resnet import resnet50
from dino_model.models.vit import VIT_CONFIGS, DinoVisionTransformer, vit

ARCHS: tuple[str, ...] = (*VIT_CONFIGS, "resnet50")


def build_backbone(arch: str, patch_size: int = 16, drop_path_rate: float = 0.0, img_size: int = 224) -> nn.Module:
    """Randomly initialised backbone whose `forward(x) -> [B, embed_dim]`; attribute `embed_dim`.

    arch: one of `ARCHS`.  For ViTs: `patch_size` (8 or 16 in the paper; any divisor-friendly size works),
    `drop_path_rate` (stochastic depth, linear over depth; the student uses 0.1, the teacher 0) and `img_size`
    (the size the position embeddings are learned at; other input sizes are interpolated as the reference).
    ResNet-50 ignores the three.
    """
    if arch in VIT_CONFIGS:
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if img_size < patch_size:
            raise ValueError(f"img_size ({img_size}) must be >= patch_size ({patch_size})")
        return vit(arch, patch_size=patch_size, drop_path_rate=drop_path_rate, img_size=img_size)
    if arch == "resnet50":
        return resnet50()
    raise ValueError(f"arch: unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


__all__ = [
    "ARCHS",
    "DINOHead",
    "DinoVisionTransformer",
    "MultiCropWrapper",
    "VIT_CONFIGS",
    "WeightNormLinear",
    "build_backbone",
    "convert_reference_head_state_dict",
    "resnet50",
]

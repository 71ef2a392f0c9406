"""Multi-crop wrapper: one backbone pass per run of consecutive same-resolution crops, one head pass for all.

With 2 global crops followed by N local crops this is 2 backbone calls (one on the 2·B global images, one on
the N·B local ones) instead of 2 + N, as in the reference.  The output rows are in crop order:
rows [i·B, (i+1)·B) belong to crop i.
"""

from __future__ import annotations

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """`forward(list of [B, C, H_i, W_i] crops) -> head(concat of backbone features)`: [len(crops)·B, out_dim]."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: list[torch.Tensor] | torch.Tensor,
                with_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``head(features)``; with ``with_features`` also the backbone features themselves ([len(crops)·B, D])."""
        if not isinstance(x, (list, tuple)):
            x = [x]
        features = []
        start = 0
        while start < len(x):
            end = start + 1
            while end < len(x) and x[end].shape[-2:] == x[start].shape[-2:]:
                end += 1
            out = self.backbone(torch.cat(list(x[start:end])))
            if isinstance(out, tuple):
                out = out[0]
            features.append(out)
            start = end
        features = torch.cat(features)
        out = self.head(features)
        return (out, features) if with_features else out

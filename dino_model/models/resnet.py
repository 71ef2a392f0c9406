"""ResNet-50 backbone for DINO (the reference's convnet option): torchvision `resnet50(weights=None)`.

The classifier is replaced by an identity so `forward(x) -> [B, 2048]` is the globally pooled feature, as in the
reference (`student.fc, student.head = nn.Identity(), nn.Identity()`).  Its recipe differs from the ViTs' (SGD,
constant weight decay 1e-4, SyncBatchNorm in multi-GPU runs): see `DINO.convert_sync_batchnorm`.
"""

from __future__ import annotations

import torchvision
from torch import nn


def resnet50() -> nn.Module:
    """Randomly initialised torchvision ResNet-50 without classifier; attribute `embed_dim = 2048`."""
    model = torchvision.models.resnet50(weights=None)
    model.embed_dim = model.fc.weight.shape[1]
    model.fc = nn.Identity()
    model.head = nn.Identity()
    return model

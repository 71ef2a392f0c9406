"""Losses, one per file."""

from dino_model.losses.dino_loss import DINOLoss

__all__ = ["DINOLoss"]

"""Checkpoints of the reference implementation (facebookresearch/dino), converted to this project's key names for
evaluation: its training ``checkpoint.pth`` (``student`` / ``teacher`` / ``dino_loss`` / ``args`` with
``module.backbone.*`` / ``backbone.*`` prefixes and weight-normed heads), the released
``*_pretrain_full_checkpoint.pth`` (same keys) and a bare backbone state_dict (``*_pretrain.pth``). Loading uses
``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allowed beyond plain types.
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Any, Iterable, Mapping

import torch

from dino_model.storage import LocalStore, ObjectNotFound, open_object

__all__ = ["load_reference_checkpoint", "strip_prefix"]


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the first matching prefix from each key (keys without any of them are kept as they are)."""
    prefixes = list(prefixes)
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k] = v
    return out


def _split_wrapper(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A reference MultiCropWrapper state_dict (``module.``/no prefix) -> (backbone, head) state dicts, ours."""
    from dino_model.models.head import convert_reference_head_state_dict

    sd = strip_prefix(sd, ["module."])
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    head = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
    # A bare backbone state_dict (the released "*_pretrain.pth" files) has neither prefix.
    if not backbone and not head:
        backbone = dict(sd)
    # The reference ViT/ResNet keep an unused classifier (Identity) - nothing to drop for ViT; ResNet "fc.*" if any.
    backbone = {k: v for k, v in backbone.items() if not k.startswith(("fc.", "head."))}
    return backbone, convert_reference_head_state_dict(head) if head else head


def load_reference_checkpoint(uri: str | os.PathLike) -> dict[str, Any]:
    """A facebookresearch/dino checkpoint converted to this project's key names, for evaluation.

    Accepts the training checkpoint (``student``, ``teacher``, ``dino_loss``, ``args``, ...), the released
    ``*_pretrain_full_checkpoint.pth`` (same keys) and a bare backbone state_dict (``*_pretrain.pth``). Loading
    uses ``weights_only=True`` with only ``argparse.Namespace`` allowed beyond plain types.

    Returns ``{"teacher_backbone", "teacher_head", "student_backbone", "student_head", "center", "args"}`` —
    missing parts are ``{}`` / ``None``; ``args`` is a plain dict.
    """
    store, key = open_object(os.fspath(uri))
    if isinstance(store, LocalStore):
        src: Any = store.local_path(key)
        if not src.is_file():
            raise ObjectNotFound(f"checkpoint {uri} does not exist")
    else:
        src = io.BytesIO(store.get_bytes(key))
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict):
        raise ValueError(f"{uri}: expected a dict checkpoint, got {type(raw).__name__}")
    out: dict[str, Any] = {
        "teacher_backbone": {},
        "teacher_head": {},
        "student_backbone": {},
        "student_head": {},
        "center": None,
        "args": {},
    }
    if "teacher" in raw or "student" in raw:
        if "teacher" in raw:
            out["teacher_backbone"], out["teacher_head"] = _split_wrapper(raw["teacher"])
        if "student" in raw:
            out["student_backbone"], out["student_head"] = _split_wrapper(raw["student"])
        loss_sd = raw.get("dino_loss") or {}
        out["center"] = loss_sd.get("center")
        args = raw.get("args")
        if isinstance(args, argparse.Namespace):
            args = vars(args)
        out["args"] = dict(args) if isinstance(args, dict) else {}
    else:
        out["teacher_backbone"], out["teacher_head"] = _split_wrapper(raw)
    return out

"""Checkpoint file names under a checkpoint URI, and finding them by listing (the layout is in
:mod:`dino_model.checkpoint`). Kept free of torch so that the ``dino`` command's checks (``--resume never`` /
``require``) can list a checkpoint URI before anything heavy is imported."""

from __future__ import annotations

import re

from dino_model.storage import open_store

#: ``checkpoint-<step, 9 digits>.pt``; the group is the step.
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    """``checkpoint-000001200.pt`` for step 1200 (zero-padded so names sort like steps)."""
    if step < 0 or step >= 10**9:
        raise ValueError(f"checkpoint step must be in [0, 1e9), got {step}")
    return f"checkpoint-{step:09d}.pt"


def list_checkpoints(uri: str) -> list[tuple[int, str]]:
    """``(step, full URI)`` of every complete checkpoint directly under ``uri``, oldest first."""
    store = open_store(uri)
    found = []
    for obj in store.list("checkpoint-"):
        m = CHECKPOINT_NAME.match(obj.key)
        if m:
            found.append((int(m.group(1)), store.url(obj.key)))
    return sorted(found)


def latest_checkpoint(uri: str) -> str | None:
    """The full URI of the newest checkpoint under ``uri``, or ``None``."""
    found = list_checkpoints(uri)
    return found[-1][1] if found else None

"""The DAVIS-2017 folder layout: which sequences an image set lists, each sequence's frames and annotation masks.

    <root>/ImageSets/2017/val.txt               one sequence name per line
    <root>/JPEGImages/480p/<sequence>/00000.jpg ...
    <root>/Annotations/480p/<sequence>/00000.png ...   indexed PNGs (0 = background, 1..K objects, 255 void)

No torch here: the evaluation's input checks read the layout before anything heavy is imported
(``tasks/validation``); :mod:`dino_model.eval.davis_propagation` and :mod:`dino_model.eval.attention_maps` use it
to run the evaluations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class DavisSequence:
    """One sequence of a DAVIS-2017 folder: frame JPEGs and (where present) annotation PNGs, in frame order."""

    name: str
    frames: list[Path]
    #: Annotation path per frame, None where the frame has no annotation (test sets annotate only frame 0).
    annotations: list[Path | None]

    @property
    def frame_names(self) -> list[str]:
        return [p.stem for p in self.frames]

    def first_mask(self) -> np.ndarray:
        if self.annotations[0] is None:
            raise FileNotFoundError(f"sequence {self.name!r} has no first-frame mask")
        return read_mask(self.annotations[0])

    def has_all_annotations(self) -> bool:
        return all(a is not None for a in self.annotations)


def list_sequences(root: str | os.PathLike, image_set: str = "2017/val.txt") -> list[str]:
    """Sequence names listed in ``<root>/ImageSets/<image_set>`` (one per line)."""
    path = Path(root) / "ImageSets" / image_set
    if not path.is_file():
        raise FileNotFoundError(f"DAVIS image set {path} not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"DAVIS image set {path} lists no sequence")
    return names


def load_sequence(root: str | os.PathLike, name: str, resolution: str = "480p") -> DavisSequence:
    """The frames and annotations of ``name`` under ``<root>/JPEGImages/<res>/`` and ``Annotations/<res>/``.

    Raises :class:`FileNotFoundError` when the sequence has no frames or no first-frame mask."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"invalid sequence name {name!r}")
    root = Path(root)
    frame_dir = root / "JPEGImages" / resolution / name
    frames = sorted(frame_dir.glob("*.jpg"))
    if not frames:
        raise FileNotFoundError(f"sequence {name!r}: no frames (*.jpg) in {frame_dir}")
    ann_dir = root / "Annotations" / resolution / name
    annotations = [(ann_dir / f"{p.stem}.png") for p in frames]
    annotations = [a if a.is_file() else None for a in annotations]
    if annotations[0] is None:
        raise FileNotFoundError(f"sequence {name!r} has no first-frame mask {ann_dir / (frames[0].stem + '.png')}")
    return DavisSequence(name, frames, annotations)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A DAVIS annotation as a uint8 label map ``[H, W]`` (palette indices)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L"):
            raise ValueError(f"{path}: expected an indexed (P) or greyscale (L) PNG, got mode {im.mode}")
        return np.array(im, dtype=np.uint8)

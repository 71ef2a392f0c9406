"""Small DAVIS-2017-layout video sequences drawn procedurally, with exact foreground masks, for the README demo
(attention-map Jaccard and label propagation need frames *and* masks; the demo must not need real DAVIS data).

Each sequence is one shape (from :mod:`dino_model.data.synthetic`'s vocabulary of shapes) moving and turning over
a fixed noisy background; the mask is the shape's own pixels. Layout, as the DAVIS-2017 toolkit expects::

    root/JPEGImages/480p/<seq>/00000.jpg ...
    root/Annotations/480p/<seq>/00000.png ...   (palette PNG: 0 background, 1 object)
    root/ImageSets/2017/val.txt

    python -m dino_model.data.synthetic_video /tmp/davis-synthetic --sequences 2 --frames 8
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dino_model.eval.davis_palette import DAVIS_PALETTE_FLAT

SHAPES = ("star", "square", "triangle", "circle")


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    sides, inner = {"star": (5, 0.45), "square": (4, None), "triangle": (3, None), "circle": (32, None)}[kind]
    steps = sides * 2 if inner else sides
    pts = []
    for i in range(steps):
        radius = r if not inner or i % 2 == 0 else r * inner
        a = angle + 2 * math.pi * i / steps
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def make_synthetic_davis(root: str | Path, sequences: int = 2, frames: int = 8, width: int = 128, height: int = 96,
                         seed: int = 0) -> dict:
    """Write ``sequences`` sequences of ``frames`` frames under ``root``; returns a summary. Deterministic."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = []
    for s in range(sequences):
        name = f"synthetic-{SHAPES[s % len(SHAPES)]}-{s}"
        names.append(name)
        img_dir = root / "JPEGImages" / "480p" / name
        ann_dir = root / "Annotations" / "480p" / name
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        background = np.clip(rng.integers(20, 100, 3) + rng.normal(0, 14, (height, width, 3)), 0, 255).astype(np.uint8)
        colour = tuple(int(c) for c in rng.integers(140, 256, 3))
        r = min(width, height) * rng.uniform(0.18, 0.26)
        x0, y0 = rng.uniform(r, width - r), rng.uniform(r, height - r)
        vx, vy = rng.uniform(-1, 1, 2) * min(width, height) * 0.04
        for f in range(frames):
            cx = float(np.clip(x0 + vx * f, r, width - r))
            cy = float(np.clip(y0 + vy * f, r, height - r))
            poly = _shape_polygon(SHAPES[s % len(SHAPES)], cx, cy, r, 0.15 * f)
            frame = Image.fromarray(background.copy(), "RGB")
            ImageDraw.Draw(frame).polygon(poly, fill=colour)
            frame.save(img_dir / f"{f:05d}.jpg", quality=92)
            mask = Image.new("P", (width, height), 0)
            ImageDraw.Draw(mask).polygon(poly, fill=1)
            mask.putpalette(DAVIS_PALETTE_FLAT)
            mask.save(ann_dir / f"{f:05d}.png")
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    (sets / "val.txt").write_text("".join(f"{n}\n" for n in names))
    return {"root": str(root), "sequences": names, "frames": frames, "size": (width, height)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_synthetic_davis(a.root, a.sequences, a.frames, a.width, a.height, a.seed))


if __name__ == "__main__":
    main()

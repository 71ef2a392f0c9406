"""A small labelled ImageFolder dataset drawn procedurally, for the README demo and for tests that must not need
``../shared``: each class is a kind of shape or texture, drawn with random colours, size, position and rotation
over a noisy background, so the classes are learnable but not trivially identical images.

    python -m dino_model.data.synthetic /tmp/synthetic --classes 6 --per-class 40
    >>> info = make_synthetic_imagefolder("/tmp/synthetic", classes=6, per_class=40, size=96, seed=0)

Deterministic: the same arguments write byte-identical files. Mostly JPEG, with every ``png_every``-th image a PNG
(some with alpha), so the shard writer's re-encoding path runs in the demo too.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Class id (folder name) -> what is drawn.
CLASSES = ("circle", "square", "triangle", "stripes", "checker", "ring", "cross", "dots", "star", "waves")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(30, 256, 3))


def _polygon(cx: float, cy: float, r: float, n: int, angle: float, inner: float | None = None) -> list[tuple]:
    pts = []
    steps = n * 2 if inner else n
    for i in range(steps):
        radius = r if not inner or i % 2 == 0 else r * inner
        a = angle + 2 * math.pi * i / steps
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def draw_sample(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``kind``."""
    background = rng.integers(0, 90, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    fg = _colour(rng)
    r = size * rng.uniform(0.18, 0.38)
    cx, cy = rng.uniform(r, size - r, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=fg)
    elif kind == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, angle), fill=fg)
    elif kind == "star":
        d.polygon(_polygon(cx, cy, r * 1.3, 5, angle, inner=0.45), fill=fg)
    elif kind == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r / 3)))
    elif kind == "cross":
        w = max(2, int(r / 2.5))
        d.line([(cx - r, cy), (cx + r, cy)], fill=fg, width=w)
        d.line([(cx, cy - r), (cx, cy + r)], fill=fg, width=w)
    elif kind == "stripes":
        period = int(rng.integers(6, 16))
        for x in range(-size, 2 * size, period):
            d.line([(x, 0), (x + size * math.tan(angle % 1.2), size)], fill=fg, width=period // 2)
    elif kind == "checker":
        cell = int(rng.integers(6, 18))
        for y in range(0, size, cell):
            for x in range(0, size, cell):
                if (x // cell + y // cell) % 2 == 0:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)
    elif kind == "dots":
        for _ in range(int(rng.integers(8, 20))):
            x, y = rng.uniform(0, size, 2)
            rr = size * rng.uniform(0.03, 0.07)
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=_colour(rng))
    elif kind == "waves":
        period = rng.uniform(8, 20)
        for x in range(size):
            y = size / 2 + r * math.sin(2 * math.pi * x / period + angle)
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=fg)
    else:
        raise ValueError(f"unknown synthetic class {kind!r}; choose from {CLASSES}")
    return img


def make_synthetic_imagefolder(
    root: str | Path, classes: int = 6, per_class: int = 40, size: int = 96, seed: int = 0, png_every: int = 10,
    quality: int = 90,
) -> dict:
    """Write ``root/<class>/<class>_<i>.{jpg,png}`` plus ``root/classes.txt``; returns a summary dict."""
    if not 1 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be in 1..{len(CLASSES)}, got {classes}")
    if per_class < 1 or not 16 <= size <= 1024:
        raise ValueError(f"per_class must be >= 1 and size in 16..1024 (got {per_class}, {size})")
    root = Path(root)
    names = list(CLASSES[:classes])
    counts = {"jpeg": 0, "png": 0}
    for c, kind in enumerate(names):
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, c, i])  # per image: any subset regenerates identically
            img = draw_sample(kind, size, rng)
            buf = io.BytesIO()
            if png_every and i % png_every == png_every - 1:
                if i % (2 * png_every) == png_every - 1:  # every other PNG carries an alpha channel
                    img = img.convert("RGBA")
                    img.putalpha(Image.new("L", img.size, 255 - 40 * (i % 3)))
                img.save(buf, "PNG")
                path, counts["png"] = folder / f"{kind}_{i:04d}.png", counts["png"] + 1
            else:
                img.save(buf, "JPEG", quality=quality)
                path, counts["jpeg"] = folder / f"{kind}_{i:04d}.jpg", counts["jpeg"] + 1
            path.write_bytes(buf.getvalue())
    (root / "classes.txt").write_text("".join(f"{k} {k} shape\n" for k in names))
    return {"root": str(root), "classes": names, "images": classes * per_class, **counts}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(make_synthetic_imagefolder(args.root, args.classes, args.per_class, args.size, args.seed))


if __name__ == "__main__":
    main()

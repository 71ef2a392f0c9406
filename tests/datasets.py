"""Small labelled shard sets that the tests build themselves (known content, a few KB)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dino_model.data.shard_writer import ShardOptions, write_dataset
from dino_model.data.sources import SourceSpec, scan_source


def write_colour_set(root, dest, classes, per_class: int, seed: int, name: str, shard_size: int = 8) -> str:
    """``per_class`` noisy 40-px JPEGs of one distinct colour per class in ``classes`` (an ImageFolder under
    ``root``), sharded ``shard_size`` samples per shard to ``dest``; returns ``dest``."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((40, 40, 3), np.uint8) + np.array([60 * c, 255 - 60 * c, 128], np.uint8)
            img = np.clip(base + rng.integers(0, 60, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"img{i}.jpg", quality=90)
    write_dataset(scan_source(SourceSpec(str(root))), str(dest), ShardOptions(name=name, shard_size=shard_size))
    return str(dest)

"""What the ranged-extraction tests share (tests/test_task_runners.py on a Dask cluster, tests/test_slurm.py on
Slurm worker jobs): the same inputs, and one check that the ranged features are the single process's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.datasets import write_colour_set


def ranged_extraction_inputs(tmp_path: Path) -> tuple[str, str, dict]:
    """A labelled shard set of 21 images (3 classes x 7, shards of 8, 8, 5: two ranges cross a shard), a seeded
    random ViT-Tiny/16 export, and the features settings of a small extraction."""
    import torch

    from dino_model.export import export_backbone
    from dino_model.models import build_backbone

    data = write_colour_set(tmp_path / "img", tmp_path / "train", range(3), 7, 3, "train")
    torch.manual_seed(0)
    export = str(tmp_path / "export")
    export_backbone(build_backbone("vit_tiny", patch_size=16), export, arch="vit_tiny", patch_size=16)
    return data, export, {"resize_size": None, "crop_size": 32, "batch_size": 3}


def assert_same_features(single: str, ranged: str, rows: int) -> None:
    """The ranged extraction reads back as the single-process one: keys, labels and metadata equal, features within
    1e-5 (another batch composition)."""
    from dino_model.eval.features import read_features

    k1, l1, f1, m1 = read_features(single, "train")
    k2, l2, f2, m2 = read_features(ranged, "train")
    assert k2 == k1 and len(set(k2)) == rows
    np.testing.assert_array_equal(l2, l1)
    np.testing.assert_allclose(f2, f1, rtol=1e-5, atol=1e-5)
    assert m2 == m1

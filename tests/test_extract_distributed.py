"""Feature extraction over several processes: ``torchrun -m dino_model.eval.extract`` (gloo on CPU) writes the same
rows as the single-process extraction — every sample exactly once, same keys, labels and features, read back in the
same order — and the evaluation reader's per-rank sample ranges cover the set without overlap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dino_model.eval.features import list_feature_files, read_features
from dino_model.eval.shard_source import EvalShardSet
from tests.datasets import write_colour_set


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """3 classes x 7 images in shards of 8 (8, 8, 5 samples): rank ranges cut through shards."""
    base = tmp_path_factory.mktemp("uneven")
    return {"train": write_colour_set(base / "img", base / "train", range(3), 7, 3, "train"),
            "val": write_colour_set(base / "val-img", base / "val", range(1, 3), 2, 4, "val"), "base": base}


def test_rank_ranges_read_every_sample_once(uneven):
    shards = EvalShardSet(uneven["train"])
    assert shards.num_shards == 3 and shards.num_samples == 21
    everything = [k for k, _, _ in shards.samples()]
    for world in (1, 2, 3, 4, 32):
        ranges = [shards.rank_range(r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 21
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, disjoint
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1  # balanced
        keys = [k for rng in ranges for k, _, _ in shards.samples(sample_range=rng)]
        assert keys == everything
    batches = list(shards.batches(4, sample_range=(3, 9)))
    assert [k for b in batches for k in b[0]] == everything[3:9] and [len(b[0]) for b in batches] == [4, 2]
    with pytest.raises(ValueError, match="rank must be in"):
        shards.rank_range(2, 2)
    with pytest.raises(ValueError, match="cannot be combined"):
        list(shards.samples(shard_order=[0], sample_range=(0, 1)))


@pytest.mark.slow
def test_torchrun_extraction_equals_single_process(uneven, tmp_path):
    """2 gloo processes through the extract-features task (the dino-extract / dino-evaluate path) and 1 process
    give identical datasets; the 2-process run also replaces the parts of an earlier single-process extraction."""
    from dino_model.export import export_backbone
    from dino_model.models import build_backbone
    from tasks.evaluation import ExtractionSpec, extract_split_features
    from tasks.validation.extraction_settings import FeatureSettings

    torch.manual_seed(0)
    export = tmp_path / "export"
    export_backbone(build_backbone("vit_tiny", patch_size=16), str(export), arch="vit_tiny", patch_size=16)
    # a label map (this set's class index -> another index space) exercises the --label-map hand-over
    label_map = [2, 0, 1]
    features = FeatureSettings(resize_size=None, crop_size=32, batch_size=3)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    meta = {"model_version": 1}
    data = uneven["train"]

    def spec(output: str) -> ExtractionSpec:
        return ExtractionSpec(str(export), data, output, "train", features, "cpu", meta, label_map)

    one = extract_split_features.fn(spec(single))
    extract_split_features.fn(spec(multi))  # part-00000, replaced below
    two = extract_split_features.fn(spec(multi), nproc_per_node=2)
    assert two["num_rows"] == one["num_rows"] == 21
    assert (two["dim"], two["feature_kind"]) == (one["dim"], one["feature_kind"]) == (192, "cls")
    names = [key.split("/")[1] for _, key in list_feature_files(multi, "train")]
    assert names == ["part-r0000-00000.parquet", "part-r0001-00000.parquet"]  # the single-process parts are gone

    k1, l1, f1, m1 = read_features(single, "train")
    k2, l2, f2, m2 = read_features(multi, "train")
    assert k2 == k1 and len(set(k2)) == 21
    np.testing.assert_array_equal(l2, l1)
    assert l2.tolist() == [label_map[label] for _, _, label in EvalShardSet(data).samples()]
    np.testing.assert_allclose(f2, f1, rtol=1e-5, atol=1e-5)
    assert m2 == m1

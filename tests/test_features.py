"""Feature extraction to Parquet: schema, values, metadata, partitioning, local and SeaweedFS round trips."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dino_model.eval.features import (
    FeatureRecipe,
    backbone_features,
    extract_features,
    list_feature_files,
    read_features,
)
from dino_model.eval.transforms import EvalTransform, normalize
from dino_model.models import build_backbone

CROP = EvalTransform(resize_size=None, crop_size=32)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=16).eval()


def _batches(n=10, bs=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, 40, 48), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    keys = [f"img{i:03d}" for i in range(n)]
    return [(keys[i : i + bs], imgs[i : i + bs], labels[i : i + bs]) for i in range(0, n, bs)], imgs, labels, keys


def _expected(backbone, imgs):
    # centre crop 32 of a 40x48 image: rows 4..36, cols 8..40
    with torch.no_grad():
        return backbone(normalize(imgs[:, :, 4:36, 8:40])).numpy()


def test_local_round_trip(tmp_path, backbone):
    batches, imgs, labels, keys = _batches()
    out = tmp_path / "feats"
    res = extract_features(backbone, batches, str(out), "train", {"model_version": "7", "model_name": "dino"},
                           recipe=FeatureRecipe(CROP), rows_per_file=4, progress=False)
    assert res.num_rows == 10 and res.dim == 192 and len(res.files) == 3
    assert [p.name for p in sorted((out / "train").iterdir())] == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(out / "train" / "part-00000.parquet")
    assert table.schema.field("key").type == pa.string()
    assert table.schema.field("label").type == pa.int64()
    assert table.schema.field("split").type == pa.string()
    assert table.schema.field("features").type == pa.list_(pa.float32(), 192)
    assert table.num_rows == 4

    k, lab, f, meta = read_features(str(out), split="train")
    assert k == keys
    assert lab.dtype == np.int64 and lab.tolist() == labels.tolist()
    assert f.dtype == np.float32 and f.shape == (10, 192)
    np.testing.assert_allclose(f, _expected(backbone, imgs), rtol=1e-5, atol=1e-5)
    assert meta["model_version"] == "7" and meta["model_name"] == "dino"
    assert meta["feature_kind"] == "cls" and meta["dim"] == 192 and meta["precision"] == "fp32"
    assert meta["preprocessing"].startswith("resize=None") and "center_crop=32" in meta["preprocessing"]
    assert meta["split"] == "train" and meta["splits"] == ["train"]


def test_splits_and_reextraction_replace_old_parts(tmp_path, backbone):
    out = str(tmp_path / "feats")
    batches, *_ = _batches(10, 3)
    extract_features(backbone, batches, out, "train", {}, recipe=FeatureRecipe(CROP), rows_per_file=3, progress=False)
    assert len(list_feature_files(out, "train")) == 4
    small, *_ = _batches(4, 2, seed=1)
    extract_features(backbone, small, out, "val", {}, recipe=FeatureRecipe(CROP), progress=False)
    keys, labels, feats, meta = read_features(out)
    assert len(keys) == 14 and feats.shape == (14, 192) and meta["splits"] == ["train", "val"]
    # a shorter re-extraction of train leaves no stale part behind
    extract_features(backbone, small, out, "train", {}, recipe=FeatureRecipe(CROP), rows_per_file=3, progress=False)
    assert [k for _, k in list_feature_files(out, "train")] == ["train/part-00000.parquet", "train/part-00001.parquet"]
    assert len(read_features(out, "train")[0]) == 4


def test_linear_probe_features_any_n(tmp_path, backbone):
    batches, imgs, *_ = _batches(4, 4)
    res = extract_features(backbone, batches, str(tmp_path), "val", {},
                           recipe=FeatureRecipe(CROP, n_last_blocks=2, avgpool=True), progress=False)
    assert res.dim == 3 * 192 and res.metadata["feature_kind"] == "cls_last2+avgpool"
    _, _, f, _ = read_features(str(tmp_path), "val")
    x = normalize(imgs[:, :, 4:36, 8:40])
    with torch.no_grad():
        outs = backbone.get_intermediate_layers(x, 2)
        manual = torch.cat([outs[0][:, 0], outs[1][:, 0], outs[1][:, 1:].mean(1)], dim=1).numpy()
        np.testing.assert_allclose(f, manual, rtol=1e-5, atol=1e-5)
        # the last block's [CLS] through the final norm is the backbone's output
        np.testing.assert_allclose(f[:, 192:384], backbone(x).numpy(), rtol=1e-5, atol=1e-5)
        assert backbone_features(backbone, x, 4).shape == (4, 4 * 192)


def test_bf16_close_to_fp32(tmp_path, backbone):
    batches, imgs, *_ = _batches(6, 6)
    res = extract_features(backbone, batches, str(tmp_path), "val", {}, recipe=FeatureRecipe(CROP, precision="bf16"),
                           progress=False)
    assert res.metadata["precision"] == "bf16"
    _, _, f, _ = read_features(str(tmp_path), "val")
    ref = _expected(backbone, imgs)
    cos = (f * ref).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref, axis=1)
    assert f.dtype == np.float32 and cos.min() > 0.99


def test_s3_round_trip(s3_bucket, backbone):
    batches, imgs, labels, keys = _batches(7, 3)
    uri = f"{s3_bucket}/features/run1"
    res = extract_features(backbone, batches, uri, "train", {"model_uri": "models:/dino/1"},
                           recipe=FeatureRecipe(CROP), rows_per_file=5, progress=False)
    assert res.files == [f"{uri}/train/part-00000.parquet", f"{uri}/train/part-00001.parquet"]
    k, lab, f, meta = read_features(uri, "train")
    assert k == keys and lab.tolist() == labels.tolist() and meta["model_uri"] == "models:/dino/1"
    np.testing.assert_allclose(f, _expected(backbone, imgs), rtol=1e-5, atol=1e-5)


def test_bad_input(tmp_path, backbone):
    img = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    normalise_only = FeatureRecipe(transform=None)
    with pytest.raises(ValueError, match="2 keys, 2 images and 3 labels"):
        extract_features(backbone, [(["a", "b"], img, [0, 1, 2])], str(tmp_path), "x", recipe=normalise_only,
                         progress=False)
    with pytest.raises(ValueError, match="duplicate sample key 'a'"):
        extract_features(backbone, [(["a", "a"], img, [0, 1])], str(tmp_path), "x", recipe=normalise_only,
                         progress=False)
    with pytest.raises(ValueError, match="evaluation set is empty"):
        extract_features(backbone, [], str(tmp_path), "x", recipe=normalise_only, progress=False)
    with pytest.raises(ValueError, match="split must match"):
        extract_features(backbone, [], str(tmp_path), "../x", progress=False)
    with pytest.raises(ValueError, match="precision must be"):
        extract_features(backbone, [], str(tmp_path), "x", recipe=FeatureRecipe(precision="fp16"), progress=False)
    with pytest.raises(FileNotFoundError, match="no feature files"):
        read_features(str(tmp_path / "nothing"))
    assert not list((tmp_path).rglob("*.parquet"))

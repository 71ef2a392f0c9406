"""Reading a feature store into one preallocated array (the same result as concatenating the parts), the float16
store (round trip, local and SeaweedFS, range check) and what it does to the k-NN and linear-probe scores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dino_model.eval.features import FeatureRecipe, extract_features, list_feature_files, list_feature_parts, read_features
from dino_model.eval.knn import knn_classify, knn_predict
from dino_model.eval.linear_probe import linear_probe_on_features
from dino_model.eval.transforms import EvalTransform
from dino_model.models import build_backbone
from dino_model.storage import open_store

CROP = EvalTransform(resize_size=None, crop_size=32)


def _pixel_batches(n: int, bs: int, seed: int, prefix: str = "img", scale: float = 1.0):
    """``n`` 3 x 4 x 4 images (labels i mod 3) in batches of ``bs``; features = the normalised pixels x scale."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    keys = [f"{prefix}{i:03d}" for i in range(n)]
    return [(keys[i : i + bs], imgs[i : i + bs] if scale == 1.0 else imgs[i : i + bs], labels[i : i + bs])
            for i in range(0, n, bs)]


class _Scaled(torch.nn.Module):
    """Flattened pixels times a factor: 48 features per 3 x 4 x 4 image."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.scale


def _concatenated_parts(uri: str, split: str | None):
    """What reading used to do: every part read whole, then everything concatenated."""
    store = open_store(uri)
    keys, labels, feats = [], [], []
    for _, key in list_feature_files(uri, split):
        table = pq.read_table(pa.BufferReader(store.get_bytes(key)))
        keys += table.column("key").to_pylist()
        labels.append(table.column("label").to_numpy())
        vec = table.column("features").combine_chunks()
        feats.append(vec.flatten().to_numpy().astype(np.float32).reshape(-1, vec.type.list_size))
    return keys, np.concatenate(labels), np.concatenate(feats)


def _write(uri: str, split: str, n: int, seed: int, rank: int | None = None, feature_dtype: str = "float32"):
    return extract_features(_Scaled(), _pixel_batches(n, 3, seed, f"{split}{rank}-"), uri, split, {"m": 1},
                            recipe=FeatureRecipe(transform=None, feature_dtype=feature_dtype), rows_per_file=4,
                            progress=False, rank=rank)


def test_read_into_one_array_equals_concatenated_parts(tmp_path):
    uri = str(tmp_path / "feats")
    _write(uri, "train", 10, 0, rank=0)  # parts of two ranks, 3 + 2 files
    _write(uri, "train", 7, 1, rank=1)
    _write(uri, "val", 5, 2)
    for split in ("train", "val", None):
        keys, labels, feats, meta = read_features(uri, split)
        ref_keys, ref_labels, ref_feats = _concatenated_parts(uri, split)
        assert keys == ref_keys and np.array_equal(labels, ref_labels) and np.array_equal(feats, ref_feats)
        assert feats.dtype == np.float32 and feats.flags.c_contiguous and labels.dtype == np.int64
    assert len(keys) == 22 and meta["splits"] == ["train", "val"] and "split" not in meta
    parts = list_feature_parts(uri, "train")
    assert [p.rows for p in parts] == [4, 4, 2, 4, 3] and {p.dim for p in parts} == {48}
    assert [p.key for p in parts] == [k for _, k in list_feature_files(uri, "train")]


def test_read_dtypes(tmp_path):
    uri = str(tmp_path / "feats")
    _write(uri, "val", 6, 0)
    ref = read_features(uri, "val")[2]
    assert read_features(uri, "val", dtype=None)[2].dtype == np.float32  # as stored
    half = read_features(uri, "val", dtype=np.float16)[2]
    assert half.dtype == np.float16 and np.array_equal(half, ref.astype(np.float16))
    with pytest.raises(ValueError, match="dtype must be a floating-point type"):
        read_features(uri, "val", dtype=np.int32)


def test_float16_store_round_trip(tmp_path):
    full, half = str(tmp_path / "fp32"), str(tmp_path / "fp16")
    _write(full, "train", 10, 0)
    res = _write(half, "train", 10, 0, feature_dtype="float16")
    assert res.metadata["feature_dtype"] == "float16"
    files = sorted((tmp_path / "fp16" / "train").glob("part-*.parquet"))
    assert pq.read_schema(files[0]).field("features").type == pa.list_(pa.float16(), 48)
    ref = read_features(full, "train")[2]
    keys, labels, feats, meta = read_features(half, "train")
    assert feats.dtype == np.float32 and np.array_equal(feats, ref.astype(np.float16).astype(np.float32))
    assert meta["feature_dtype"] == "float16" and read_features(full, "train")[3]["feature_dtype"] == "float32"
    stored = read_features(half, "train", dtype=None)[2]
    assert stored.dtype == np.float16 and np.array_equal(stored, ref.astype(np.float16))
    assert {p.stored for p in list_feature_parts(half)} == {np.dtype(np.float16)}


def test_float16_store_on_s3(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/features/half"
    _write(uri, "train", 9, 3, feature_dtype="float16")
    _write(str(tmp_path), "train", 9, 3, feature_dtype="float16")
    assert [p.rows for p in list_feature_parts(uri, "train")] == [4, 4, 1]  # footers read by ranged GETs
    remote, local = read_features(uri, "train", dtype=None), read_features(str(tmp_path), "train", dtype=None)
    assert remote[0] == local[0] and np.array_equal(remote[1], local[1]) and np.array_equal(remote[2], local[2])
    assert remote[2].dtype == np.float16


def test_float16_store_refuses_values_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="out of float16's range .* store them as float32"):
        extract_features(_Scaled(1e5), _pixel_batches(4, 4, 0), str(tmp_path), "x",
                         recipe=FeatureRecipe(transform=None, feature_dtype="float16"), progress=False)
    with pytest.raises(ValueError, match="feature_dtype must be one of"):
        extract_features(_Scaled(), [], str(tmp_path), "x", recipe=FeatureRecipe(feature_dtype="bfloat16"),
                         progress=False)


def _colour_batches(n_per_class: int, seed: int, prefix: str):
    """Noisy 40-px images of one colour per class (4 classes), in batches of 8."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[132, 124, 124], [124, 132, 124], [124, 124, 132], [132, 132, 124]], dtype=torch.float32)
    labels = torch.arange(4 * n_per_class) % 4
    imgs = colours[labels][:, :, None, None] + 160 * torch.rand(len(labels), 3, 40, 40, generator=g) - 80
    imgs = imgs.clamp(0, 255).to(torch.uint8)
    keys = [f"{prefix}{i:04d}" for i in range(len(labels))]
    return [(keys[i : i + 8], imgs[i : i + 8], labels[i : i + 8]) for i in range(0, len(labels), 8)]


@pytest.fixture(scope="module")
def vit_stores(tmp_path_factory):
    """ViT-Tiny features of a 4-class colour set (120 train, 60 val), stored as float32 and as float16."""
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16).eval()
    root = tmp_path_factory.mktemp("vit")
    uris = {}
    for dtype in ("float32", "float16"):
        uris[dtype] = str(root / dtype)
        for split, n, seed in (("train", 30, 0), ("val", 15, 1)):
            extract_features(backbone, _colour_batches(n, seed, split), uris[dtype], split, {},
                             recipe=FeatureRecipe(transform=CROP, feature_dtype=dtype), progress=False)
    return {d: {s: read_features(u, s, dtype=None) for s in ("train", "val")} for d, u in uris.items()}


def test_float16_store_knn_scores_within_tolerance(vit_stores):
    # stated tolerance (docs/benchmarks.md): float16 storage moves a k-NN top-1 by at most 1 point here and
    # changes at most 2 % of the predictions
    scores, preds = {}, {}
    for dtype, d in vit_stores.items():
        (_, tr_l, tr_f, _), (_, va_l, va_f, _) = d["train"], d["val"]
        assert tr_f.dtype == np.dtype(dtype)
        scores[dtype] = knn_classify(tr_f, tr_l, va_f, va_l, ks=(1, 5, 20))
        preds[dtype] = knn_predict(tr_f, tr_l, va_f, k=20)
    for k in (1, 5, 20):
        assert abs(scores["float16"][k]["top1"] - scores["float32"][k]["top1"]) <= 1.0
    assert np.mean(preds["float16"] != preds["float32"]) <= 0.02


def test_float16_store_linear_probe_within_tolerance_and_same_as_its_float32_values(vit_stores):
    runs = {}
    for dtype, d in vit_stores.items():
        (_, tr_l, tr_f, _), (_, va_l, va_f, _) = d["train"], d["val"]
        runs[dtype] = linear_probe_on_features(tr_f, tr_l, va_f, va_l, epochs=10, batch_size=16, base_lr=0.5)
    assert abs(runs["float16"].final_top1 - runs["float32"].final_top1) <= 1.0
    # each float16 batch is converted to float32 as it is taken: the same run as on the converted array
    (_, tr_l, tr_f, _), (_, va_l, va_f, _) = vit_stores["float16"]["train"], vit_stores["float16"]["val"]
    converted = linear_probe_on_features(tr_f.astype(np.float32), tr_l, va_f.astype(np.float32), va_l, epochs=10,
                                         batch_size=16, base_lr=0.5)
    assert converted.history == runs["float16"].history


def test_the_float16_store_is_chosen_from_every_entry_point():
    """dino extract --feature-dtype, dino evaluate --feature-dtype and the torchrun extraction all reach the recipe
    (a setting that stopped at one of them would silently store float32)."""
    import argparse

    from dino_model.eval.extract import build_parser
    from flows.cli.evaluation_options import add_evaluation_options, evaluation_settings
    from tasks.evaluation.features import ExtractionSpec
    from tasks.validation.extraction_settings import FeatureSettings

    spec = ExtractionSpec("models:/m/1", "/data/val", "/out", "val", FeatureSettings(feature_dtype="float16"))
    assert spec.recipe().feature_dtype == "float16"
    args = build_parser().parse_args(spec.torchrun_args("cpu"))
    assert args.feature_dtype == "float16"
    parser = argparse.ArgumentParser()
    add_evaluation_options(parser)
    data = ["--train", "/data/train", "--val", "/data/val"]
    assert evaluation_settings(parser.parse_args(data + ["--feature-dtype", "float16"])).feature_dtype == "float16"
    assert evaluation_settings(parser.parse_args(data)).feature_dtype == "float32"
    with pytest.raises(ValueError, match="feature_dtype"):
        FeatureSettings(feature_dtype="bfloat16")

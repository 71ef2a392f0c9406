"""The evaluation report builder (dino_model/eval/report.py) on real inputs: shard sets of coloured toy images, a
randomly initialised ViT-Tiny, Parquet features, the shared DAVIS sequences. Every section is built and the page is
checked to be self-contained (figures inline, no outside address)."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dino_model.eval import report as rp
from dino_model.eval.features import FeatureRecipe, extract_features, read_features
from dino_model.eval.knn import knn_classify, knn_predict
from dino_model.eval.shard_source import EvalShardSet
from dino_model.eval.transforms import EvalTransform
from dino_model.models import build_backbone
from tests.datasets import write_colour_set


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Train (4 classes x 6) and val (classes 1-3 x 3) shard sets, a random ViT-Tiny, and their [CLS] features."""
    base = tmp_path_factory.mktemp("report")
    train = EvalShardSet(write_colour_set(base / "train-img", base / "train", range(4), 6, 0, "train", shard_size=5))
    val = EvalShardSet(write_colour_set(base / "val-img", base / "val", range(1, 4), 3, 1, "val", shard_size=5))
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16).eval()
    out = str(base / "feats")
    for split, shards, lmap in (("train", train, None), ("val", val, val.label_map_to(train.classes))):
        extract_features(backbone, shards.batches(8, lmap), out, split,
                         recipe=FeatureRecipe(EvalTransform(None, 32)), progress=False)
    splits = {}
    for split in ("train", "val"):
        keys, labels, feats, _ = read_features(out, split)
        splits[split] = rp.Split(labels.astype(np.int64), feats, list(keys))
    names = rp.class_display_names(train.classes, {"class1": "one"})
    return {"train_set": train, "val_set": val, "backbone": backbone, "names": names, **splits}


def test_fetch_reads_the_samples_at_given_indices(inputs):
    train = inputs["train_set"]
    every = [k for k, _, _ in train.samples()]
    got = train.fetch([23, 0, 7, 5])  # across shards of 5, unordered
    assert {i: got[i][0] for i in got} == {0: every[0], 5: every[5], 7: every[7], 23: every[23]}
    with pytest.raises(IndexError):
        train.fetch([24])


def test_knn_predictions_agree_with_the_scores(inputs):
    tr, va = inputs["train"], inputs["val"]
    pred = knn_predict(tr.features, tr.labels, va.features, k=5, num_classes=4)
    top1 = knn_classify(tr.features, tr.labels, va.features, va.labels, ks=[5], num_classes=4)[5]["top1"]
    assert 100.0 * float((pred == va.labels).mean()) == pytest.approx(top1)


def test_every_section_and_a_self_contained_page(inputs, shared_data):
    tr, va, names, backbone = inputs["train"], inputs["val"], inputs["names"], inputs["backbone"]
    top1 = knn_classify(tr.features, tr.labels, va.features, va.labels, ks=[20], num_classes=4)[20]["top1"]
    davis = shared_data / "davis-mini"
    from dino_model.eval.davis_propagation import PropagationConfig

    sections = [
        rp.scores_section({"knn100_top1": 50.0, "knn20_top1": top1, "davis_jf_mean": 61.8},
                          {"knn20_top1": "toy-val", "knn100_top1": "toy-val", "davis_jf_mean": "davis-mini"}),
        rp.retrieval_section(tr, va, inputs["train_set"], inputs["val_set"], names, queries=4, neighbours=3),
        rp.knn_section(tr, va, names, k=20, recorded_top1=top1),
        rp.attention_section(backbone, davis, ["car-shadow", "kite-surf"], frames=2, max_frames=1, size=64),
        rp.davis_section(backbone, davis, "car-shadow", PropagationConfig(short_side=64), max_frames=5, shown=3),
        rp.feature_map_section(va, names),
    ]
    by_id = {s.id: s for s in sections}
    assert by_id["scores"].html.index("k-NN 20 top-1") < by_id["scores"].html.index("k-NN 100 top-1")
    assert "4 val images (one class after another), each followed by its 3 nearest" in by_id["retrieval"].html
    assert re.search(r"\d+ of 12 neighbours", by_id["retrieval"].html)
    assert "It equals the recorded k-NN 20 top-1" in by_id["knn"].html
    assert "on 2 DAVIS frame(s)" in by_id["attention"].html and by_id["attention"].html.count("<figure>") == 2
    assert "<code>car-shadow</code> (5 frames)" in by_id["davis"].html
    assert "t-SNE (scikit-learn" in by_id["feature-map"].html

    page = rp.render_report("Evaluation of toy v1", [("model", "models:/toy/1")], sections)
    assert not re.search(r"https?://", page)  # opens offline: no outside address, figures inline
    assert all(src.startswith("data:image/") for src in re.findall(r'src="([^"]+)"', page))
    for sid in ("scores", "retrieval", "knn", "attention", "davis", "feature-map"):
        assert f'<section id="{sid}">' in page and f'href="#{sid}"' in page


def test_collapsed_features_get_no_map_but_a_reason(inputs):
    va = inputs["val"]
    flat = rp.Split(va.labels, np.ones_like(va.features), va.keys)
    section = rp.feature_map_section(flat, inputs["names"])
    assert "take only 1 distinct value(s)" in section.html and "collapsed" in section.html
    assert rp.pick_queries(np.array([2, 2, 1, 1, 3]), 4) == [2, 0, 4, 3]
    assert rp.class_display_names(["class0", "class1"], {"class1": "one"}) == ["class0", "one"]


def test_attention_without_masks_and_stale_features(inputs, shared_data):
    """Without DAVIS the attention heads are shown on val images (no Jaccard); features whose keys no longer
    match the shard set are refused instead of pairing an image with another's neighbours."""
    val_set, va = inputs["val_set"], inputs["val"]
    (key, data, _), = val_set.fetch([0]).values()
    section = rp.attention_images_section(inputs["backbone"], [(data, f"val image {key}")], size=64)
    assert "no object masks, so no Jaccard" in section.html and section.html.count("data:image/jpeg") == 1
    # the evaluation run's attention/<sequence>.png: the same labelled figure, as PNG
    from dino_model.eval.attention_maps import davis_attention_scores

    res = davis_attention_scores(inputs["backbone"], shared_data / "davis-mini", ["kite-surf"], max_frames=1,
                                 size=64, renderer=rp.attention_png)
    png = Image.open(io.BytesIO(res.overlays["kite-surf"]))
    assert png.format == "PNG" and png.size[0] > 4 * 114  # panels of ~2.3 in at 90 dpi, not a strip of 64-px tiles
    stale = rp.Split(va.labels, va.features, ["other"] * len(va.labels))
    with pytest.raises(ValueError, match="the features are stale"):
        rp.retrieval_section(inputs["train"], stale, inputs["train_set"], val_set, inputs["names"], 2, 2)

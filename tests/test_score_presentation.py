"""How scores are presented: reading order (numeric k, k-NN 20 first), labels, percent, 2 decimals, the version-tag
layout ``eval.<set name>.<metric>`` and the reading of the earlier ``eval.<set hash>.<metric>`` tags, set names,
and the pretraining progress line (step x/y, loss, images/s, ETA). No server needed."""

from __future__ import annotations

import pytest

from dino_model.eval.score_names import as_percent, display, label, ordered
from tasks.evaluation import EvaluationSettings, default_set_name, recorded_score, score_tags
from tasks.pretrain.training_progress import TrainingProgress, describe_hardware, format_duration


def test_reading_order_is_numeric_with_the_headline_first():
    metrics = ["knn200_top1", "knn100_top1", "knn10_top1", "knn20_top1", "knn20_top5", "knn100_top5",
               "davis_seq_b_jf", "davis_seq_a_jf", "davis_f_mean", "davis_jf_mean", "attn_jaccard_union_heads",
               "attn_jaccard_best_head", "linear_best_top1", "linear_approx_best_top1", "knn20_top1_bf16_minus_fp32"]
    assert ordered(metrics) == [
        "knn20_top1", "knn10_top1", "knn100_top1", "knn200_top1", "knn20_top5", "knn100_top5",
        "knn20_top1_bf16_minus_fp32", "linear_approx_best_top1", "linear_best_top1", "attn_jaccard_best_head",
        "attn_jaccard_union_heads", "davis_jf_mean", "davis_f_mean", "davis_seq_a_jf", "davis_seq_b_jf"]
    assert label("knn20_top1") == "k-NN 20 top-1" and label("davis_jf_mean") == "DAVIS J&F mean"
    assert label("davis_seq_car-shadow_jf") == "DAVIS J&F, sequence car-shadow"


def test_one_unit_percent_and_two_decimals():
    assert as_percent({"knn20_top1": 71.5, "attn_jaccard_best_head": 0.4512, "davis_jf_mean": 0.618}) == {
        "knn20_top1": 71.5, "attn_jaccard_best_head": pytest.approx(45.12), "davis_jf_mean": pytest.approx(61.8)}
    assert display(99.66666666666667) == "99.67" and display(0) == "0.00"


def test_version_tags_hold_named_sets_rounded_and_the_hash_apart():
    metrics = {"knn20_top1": 99.66666666666667, "davis_jf_mean": 61.8049, "davis_seq_car-shadow_jf": 55.0}
    families = {"knn20_top1": "classification", "davis_jf_mean": "video", "davis_seq_car-shadow_jf": "video"}
    tags = score_tags(metrics, families, {"classification": "3f2a9c01b7de", "video": "0123456789ab"}, "RUN",
                      {"classification": "imagenette-val", "video": "davis-2017"})
    assert tags == {
        "eval.imagenette-val.knn20_top1": "99.67", "eval.imagenette-val.set_hash": "3f2a9c01b7de",
        "eval.imagenette-val.run_id": "RUN", "eval.davis-2017.davis_jf_mean": "61.80",
        "eval.davis-2017.set_hash": "0123456789ab", "eval.davis-2017.run_id": "RUN"}  # per-sequence: run only


def test_recorded_score_reads_both_tag_layouts():
    new = {"eval.imagenette-val.knn20_top1": "71.25", "eval.imagenette-val.set_hash": "3f2a9c01b7de"}
    assert recorded_score(new, "imagenette-val", "3f2a9c01b7de", "knn20_top1") == 71.25
    # the same name measured on another set (other hash): not comparable, so no score
    assert recorded_score(new, "imagenette-val", "ffffffffffff", "knn20_top1") is None
    # the earlier layout: the hash in the key, full precision, attention / DAVIS as fractions
    old = {"eval.3f2a9c01b7de.knn20_top1": "71.2466", "eval.3f2a9c01b7de.davis_jf_mean": "0.6180000000000001"}
    assert recorded_score(old, "imagenette-val", "3f2a9c01b7de", "knn20_top1") == pytest.approx(71.2466)
    assert recorded_score(old, "imagenette-val", "3f2a9c01b7de", "davis_jf_mean") == pytest.approx(61.8)
    assert recorded_score(old, "imagenette-val", "3f2a9c01b7de", "knn10_top1") is None


def test_set_names_from_shard_sets_and_their_validation():
    assert default_set_name("/data/shards/imagenette-val", "val") == "imagenette-val"
    assert default_set_name("/data/imagenette-128/val", "val") == "imagenette-128-val"
    assert default_set_name("s3://bucket/sets/val/", "val") == "sets-val"
    assert default_set_name("/x/val", "ILSVRC2012 val") == "ILSVRC2012-val"
    assert default_set_name("/data/DAVIS", "") == "DAVIS"
    ok = dict(train_data="a", val_data="b")
    assert EvaluationSettings(**ok, classification_set_name="imagenet-1k").classification_set_name == "imagenet-1k"
    with pytest.raises(ValueError, match="classification_set_name 'image.net'.*no dots"):
        EvaluationSettings(**ok, classification_set_name="image.net")
    with pytest.raises(ValueError, match="read as an evaluation-set hash"):
        EvaluationSettings(**ok, classification_set_name="3f2a9c01b7de")


def test_progress_line_has_step_loss_speed_and_eta():
    p = TrainingProgress()
    assert p.describe() == "DINO pretraining: starting"
    p.update({"event": "start", "step": 100, "total_steps": 1000, "epochs": 10, "global_batch": 256,
              "world_size": 2, "device": "cuda:0", "precision": "torch.bfloat16", "time": 0.0})
    p.update({"event": "step", "step": 110, "total_steps": 1000, "epoch": 1, "loss": 10.5, "images_per_s": 512.0,
              "time": 100.0})
    # one step record: the rate comes from images/s and the global batch (890 steps x 256 / 512 = 445 s)
    assert p.describe() == "step 110/1000 (11.0 %) · epoch 2/10 · loss 10.5000 · 512 img/s · ETA 7 min 25 s"
    p.update({"event": "step", "step": 210, "total_steps": 1000, "epoch": 2, "loss": 9.25, "images_per_s": 600.0,
              "time": 200.0})
    # two: the average rate since the first one (100 steps in 100 s), resumed steps excluded: 790 s left
    assert p.seconds_left() == pytest.approx(790.0) and p.percent() == pytest.approx(21.0)
    assert p.describe().endswith("ETA 13 min 10 s")
    assert describe_hardware({"world_size": 8, "device": "cuda:0", "precision": "torch.bfloat16",
                              "global_batch": 512}, "NVIDIA H100") == \
        "8 processes on cuda (NVIDIA H100), bf16, global batch 512"
    assert format_duration(4230) == "1 h 10 min" and format_duration(42) == "42 s"

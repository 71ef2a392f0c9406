"""The model card's content from what MLflow holds (the facts a version's tags, training run and evaluation runs
give), rendered without a server. The end-to-end card is checked by test_evaluate_flow / test_pretrain_flow and
in a browser by test_browser_ui."""

from __future__ import annotations

from tasks.model_card import evaluation_sets, render_model_description, render_version_card, training_rows

TRAINING = {
    "run_id": "r" * 32, "experiment_id": "1", "run_name": "pretrain-vits", "status": "FINISHED",
    "wall_seconds": 5025.0, "last_logged_step": 800,
    "tags": {"data": "s3://dino/shards/imagenette-train", "dataset_hash": "ab" * 32, "dataset_samples": "9469",
             "hardware": "8 processes on cuda (NVIDIA H100), bf16, global batch 512", "git_commit": "c" * 40},
    "params": {"model.arch": "vit_small", "model.patch_size": "16", "model.out_dim": "65536", "train.epochs": "100"},
    "metrics": {"loss": 2.54321, "epoch": 99.0},
}
TAGS = {
    "eval.imagenette-val.knn100_top1": "70.10", "eval.imagenette-val.knn20_top1": "72.35",
    "eval.imagenette-val.linear_approx_best_top1": "80.00", "eval.imagenette-val.set_hash": "3f2a9c01b7de",
    "eval.imagenette-val.run_id": "e" * 32, "eval.davis.davis_jf_mean": "61.80", "eval.davis.set_hash": "0" * 12,
    "eval.0123456789ab.knn20_top1": "65.4321", "eval.0123456789ab.attn_jaccard_best_head": "0.45",
    "architecture": "vit_small/16",
}


def _rows(training):
    return dict(training_rows(training, {}))


def test_training_facts_prefer_the_recorded_stop_reason_and_steps():
    rows = _rows(TRAINING)
    assert rows["data set"] == ("**imagenette-train** · 9,469 samples · hash `abababababab` · "
                                "`s3://dino/shards/imagenette-train`")
    assert rows["architecture"] == "vit_small, patch 16 (DINO head out_dim 65536)"
    assert rows["training"] == "100 epochs configured, last step logged in epoch 100 · 800 steps (last logged)"
    assert rows["wall time"] == "1 h 23 min" and rows["hardware"].startswith("8 processes on cuda")
    recorded = {**TRAINING, "tags": {**TRAINING["tags"], "stop_reason": "max_steps", "steps_done": "14800",
                                     "steps_total": "37000", "epochs_done": "40"}}
    assert _rows(recorded)["training"] == "40 of 100 epochs · 14,800 of 37,000 steps · stop reason: max_steps"
    assert _rows({})["training run"].startswith("none recorded")


def test_scores_per_set_in_reading_order_and_earlier_tags_in_percent():
    sets = evaluation_sets(TAGS)
    assert [(s["name"], s["legacy"]) for s in sets] == [("imagenette-val", False), ("davis", False),
                                                        ("0123456789ab", True)]
    assert sets[2]["scores"] == {"knn20_top1": 65.4321, "attn_jaccard_best_head": 45.0}
    # an earlier-layout set evaluated again under a name is shown once, under its name
    again = {**TAGS, "eval.3f2a9c01b7de.knn20_top1": "71.0"}
    assert [s["name"] for s in evaluation_sets(again)] == ["imagenette-val", "davis", "0123456789ab"]
    card = render_version_card("dino-backbone", 3, TAGS, TRAINING, sets, {})
    first, _, rest = card.partition("\n")
    # the versions list shows the first line raw and cut short: the headline score comes first
    assert first.startswith("72.35 % k-NN 20 top-1, 80.00 % linear probe (fast, approximate) best top-1 on "
                            "imagenette-val · 61.80 % DAVIS J&F mean on davis · DINO vit_small/16 trained on "
                            "imagenette-train")
    assert "### Scores on `imagenette-val`" in rest and "set hash `3f2a9c01b7de`" in rest
    table = rest[rest.index("### Scores on `imagenette-val`"):rest.index("### Scores on `davis`")]
    assert table.index("k-NN 20 top-1") < table.index("k-NN 100 top-1") < table.index("linear probe")
    assert "| k-NN 20 top-1&emsp; | **72.35** |" in table
    assert "### Scores on set `0123456789ab` (recorded before sets were named)" in rest
    assert "| attention Jaccard, best head&emsp; | **45.00** |" in rest
    assert "All scores are in **percent**" in rest and "Fast path" not in rest


def test_fast_path_verdicts_appear_when_tagged():
    training = {**TRAINING, "tags": {**TRAINING["tags"], "fast_path.compile": "ok"}}
    card = render_version_card("m", 1, {"fast_path.bf16_parity": "within 0.1 %"}, training, [], {})
    assert "### Fast path" in card and "| compile&emsp; | ok |" in card and "| bf16_parity&emsp; | within 0.1 % |" in card
    assert card.startswith("not evaluated yet · DINO vit_small/16") and "Not evaluated yet" in card


def test_fast_path_tags_make_one_row_per_check():
    tags = {"fast_path.data": "verified", "fast_path.data.path": "device augmentation", "fast_path.data.seconds": "2.1",
            "fast_path.data.mean_levels": "0.004", "fast_path.step": "reference", "fast_path.step.path": "eager, fp32",
            "fast_path.step.seconds": "0"}
    card = render_version_card("m", 1, tags, TRAINING, [], {})
    assert "| check | verdict | path taken | figures |" in card
    assert "| data&emsp; | verified | device augmentation | mean_levels 0.004, 2.1 s |" in card
    assert "| step&emsp; | reference | eager, fp32 |  |" in card  # a check that did not run has no time
    assert "seconds" not in card and "data.path" not in card


def test_registered_model_description_says_what_each_alias_means():
    text = render_model_description("dino-backbone", {"champion": 3, "candidate": 5, "prod": 2})
    assert "**champion** (now v3): the best evaluated version" in text
    assert "**candidate** (now v5): the newest trained version" in text
    assert "**prod** (now v2): set by hand" in text
    assert "(not set yet)" in render_model_description("m", {})

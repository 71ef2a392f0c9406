"""The ``dino-evaluate`` / ``dino-reevaluate`` / ``dino-extract`` flows end to end on CPU, against a real MLflow
server on 127.0.0.1, SeaweedFS for the Parquet features, and Prefect's ephemeral server.

The toy set is built so the outcome is known without training: four classes of distinctly coloured 40-px images.
A randomly initialised ViT-Tiny separates them perfectly (k-NN top-1 100 %), while the same backbone with its final
LayerNorm zeroed outputs constant features (every neighbour ties: one class for every image, top-1 <= 1/3). The val
set lacks class 0, so its class indices differ from the training set's and must be remapped by class id.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dino_model.data.shard_writer import ShardOptions, write_dataset
from dino_model.data.sources import SourceSpec, scan_source
from tests.datasets import write_colour_set

FAST = dict(resize_size=None, crop_size=32, batch_size=16, linear_fast_epochs=3, linear_batch_size=8,
            davis_short_side=64, attention_size=64)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """train: 4 classes x 8 images (4 shards); val: classes 1-3 x 3 images; empty: a manifest without samples."""
    base = tmp_path_factory.mktemp("toy")
    train = write_colour_set(base / "train-img", base / "train", range(4), 8, 0, "train")
    val = write_colour_set(base / "val-img", base / "val", range(1, 4), 3, 1, "val")
    (base / "empty-img" / "class0").mkdir(parents=True)
    write_dataset(scan_source(SourceSpec(str(base / "empty-img"))), str(base / "empty"), ShardOptions(name="e"))
    return {"train": train, "val": val, "empty": str(base / "empty"), "base": base}


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow_server.url)


def _register(name: str, tmp_path, degenerate: bool) -> int:
    """A new version of ``name``: a random ViT-Tiny/16 (seed 0), its final norm zeroed when ``degenerate``."""
    import mlflow

    from dino_model.export import export_backbone
    from dino_model.mlflow_model import log_backbone_model
    from dino_model.models import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16)
    if degenerate:
        backbone.norm.weight.data.zero_()
        backbone.norm.bias.data.zero_()
    export = tmp_path / f"export-{secrets.token_hex(3)}"
    export_backbone(backbone, str(export), arch="vit_tiny", patch_size=16)
    with mlflow.start_run():
        info = log_backbone_model(str(export), name="backbone", embed_dim=192, example_size=32)
    return int(mlflow.register_model(info.model_uri, name, tags={"architecture": "vit_tiny/16"}).version)


def _video_fractions(model_uri: str, settings) -> tuple[dict[str, float], dict[str, float]]:
    """The attention-map and DAVIS scores of ``model_uri`` as the library returns them (fractions), with the
    preprocessing of ``settings``."""
    import dino_model.mlflow_model  # noqa: F401 - registers the models:/ scheme with load_backbone
    from dino_model.eval.attention_maps import davis_attention_scores
    from dino_model.eval.davis_propagation import PropagationConfig, evaluate_davis
    from dino_model.export import load_backbone

    backbone = load_backbone(model_uri).eval()
    attention = davis_attention_scores(
        backbone, settings.davis_root, settings.davis_sequences, frame_step=settings.attention_frame_step,
        max_frames=settings.attention_max_frames, size=settings.attention_size,
        threshold=settings.attention_threshold, render=False, device="cpu").as_dict()
    davis = evaluate_davis(backbone, settings.davis_root, settings.davis_sequences, None,
                           PropagationConfig(short_side=settings.davis_short_side, multiple=settings.davis_multiple),
                           max_frames=settings.davis_max_frames, device="cpu", progress=False).scores.as_dict()
    return attention, davis


def _prefect_markdown(key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert arts, f"no Prefect artifact {key}"
    return arts[0].data


def _prefect_table(key: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert arts, f"no Prefect artifact {key}"
    data = arts[0].data
    return json.loads(data) if isinstance(data, str) else data


@pytest.mark.slow
def test_evaluate_and_reevaluate_move_champion(toy, tracking, s3_bucket, shared_data, tmp_path):
    from dino_model.eval.features import read_features
    from flows.evaluate import dino_evaluate, dino_reevaluate
    from tasks.evaluation import EvaluationSettings, update_champion

    name = f"toy-{secrets.token_hex(3)}"
    v1 = _register(name, tmp_path, degenerate=True)
    v2 = _register(name, tmp_path, degenerate=False)

    # v1, every evaluation, features on SeaweedFS: no champion yet -> v1 becomes champion
    full = EvaluationSettings(
        train_data=toy["train"], val_data=toy["val"], features_root=f"{s3_bucket}/features",
        evaluations=["knn", "linear_fast", "attention", "davis"], linear_n_last_blocks=2,
        davis_root=str(shared_data / "davis-mini"), davis_sequences=["car-shadow"], davis_max_frames=3,
        attention_max_frames=1, **FAST,
    )
    r1 = dino_evaluate(f"models:/{name}/{v1}", full)
    h_cls, h_vid = r1["evaluation_sets"]["classification"], r1["evaluation_sets"]["video"]
    # set names: the val shard set's folder (a bare split word, "val", gets its parent's name) and the DAVIS folder
    n_cls, n_vid = r1["evaluation_set_names"]["classification"], r1["evaluation_set_names"]["video"]
    assert n_cls == f"{toy['base'].name}-val" and n_vid == "davis-mini"
    m1 = r1["metrics"]
    # constant features: every val image gets the same class (the one most frequent among the first training
    # samples, by the tie rule), and class 0 is absent from val, so top-1 is 0 or 1/3
    low = m1["knn20_top1"]
    assert low in (0.0, pytest.approx(100 / 3))
    assert not any(m.endswith("_top5") for m in m1)  # 4 classes: top-5 says nothing, it is not reported
    assert {"linear_approx_best_top1", "attn_jaccard_best_head", "davis_jf_mean", "davis_seq_car-shadow_jf"} <= set(m1)
    # every score in percent: the library's attention and DAVIS fractions (computed here on the registered
    # backbone with the same settings) x 100
    attention, davis = _video_fractions(f"models:/{name}/{v1}", full)
    for metric in ("attn_jaccard_best_head", "attn_jaccard_mean_heads", "attn_jaccard_union_heads"):
        assert m1[metric] == pytest.approx(100 * attention[metric], rel=1e-4, abs=1e-6), metric
    for metric in ("davis_jf_mean", "davis_j_mean", "davis_f_mean", "davis_seq_car-shadow_jf"):
        assert m1[metric] == pytest.approx(100 * davis[metric], rel=1e-4, abs=1e-6), metric
    assert 0.0 <= attention["attn_jaccard_union_heads"] <= 1.0 and 0.0 <= davis["davis_jf_mean"] <= 1.0
    assert r1["champion"]["moved"] and r1["champion"]["previous"] is None
    assert tracking.get_model_version_by_alias(name, "champion").version == str(v1)

    # version tags: eval.<set name>.<metric> with 2 decimals, the set's hash and run in their own tags; the
    # per-sequence DAVIS scores stay on the run
    mv1 = tracking.get_model_version(name, str(v1))
    assert mv1.tags[f"eval.{n_cls}.knn20_top1"] == f"{low:.2f}"
    assert mv1.tags[f"eval.{n_vid}.davis_jf_mean"] == f"{m1['davis_jf_mean']:.2f}"
    assert mv1.tags[f"eval.{n_cls}.set_hash"] == h_cls and mv1.tags[f"eval.{n_vid}.set_hash"] == h_vid
    assert mv1.tags[f"eval.{n_cls}.run_id"] == r1["run_id"]
    assert not any(k.startswith(f"eval.{h_cls}") or "davis_seq_" in k for k in mv1.tags)
    # the evaluation run: named by what it evaluates, metrics rounded like the tags, linked to the version's
    # LoggedModel, to a stand-in model of its own (the run table's Model column) and to the data sets
    run = tracking.get_run(r1["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["model_version"] == str(v1)
    assert run.info.run_name == f"{name}-v{v1} knn+linear_fast+attention+davis on {n_cls} + davis-mini"
    assert run.data.metrics["knn20_top1"] == round(low, 2)
    assert r1["model_id"] and r1["model_id"] in mv1.source
    logged = tracking.get_logged_model(r1["model_id"])
    assert {(m.key, m.dataset_name, m.dataset_digest) for m in logged.metrics} >= {
        ("knn20_top1", n_cls, h_cls), ("davis_jf_mean", n_vid, h_vid)}
    assert {m.model_id for m in run.inputs.model_inputs} == {r1["model_id"]}
    (stand_in,) = [o.model_id for o in run.outputs.model_outputs]
    assert tracking.get_logged_model(stand_in).name == f"{name}-v{v1}"
    inputs = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert {(n_cls, h_cls, "validation"), (n_vid, h_vid, "validation")} <= inputs
    assert any(ctx == "training" for _, _, ctx in inputs)
    assert "attention/car-shadow.png" in {f.path for f in tracking.list_artifacts(r1["run_id"], "attention")}
    assert r1["report"] == "report/evaluation-report.html" and run.data.tags["report.artifact"] == r1["report"]
    assert "report/evaluation-report.html" in {f.path for f in tracking.list_artifacts(r1["run_id"], "report")}
    # the model card (the version's description) and the registered model's description
    assert f"### Scores on `{n_cls}`" in mv1.description and "| k-NN 20 top-1&emsp; |" in mv1.description
    assert mv1.description.index(f"Scores on `{n_cls}`") < mv1.description.index("Scores on `davis-mini`")
    assert "**champion** (now v1)" in tracking.get_registered_model(name).description
    # the Prefect table: reading order (k-NN 20 first, k numeric), the champion decision in its description
    table = _prefect_table(f"dino-evaluate-{name}-v{v1}")
    assert {row["metric"] for row in table} == set(m1)
    order = [row["metric"] for row in table]
    assert order[0] == "knn20_top1" and order.index("knn10_top1") < order.index("knn100_top1") < order.index(
        "knn200_top1") < order.index("linear_approx_best_top1") < order.index("davis_jf_mean")
    assert table[0]["value (%)"] == f"{low:.2f}" and table[0]["evaluation set"] == n_cls

    # Parquet on S3: schema, metadata, labels of val remapped onto the training classes (class0 absent)
    schema = pq.read_schema(pa.BufferReader(_first_part(r1["features"]["cls"], "val")))
    assert schema.field("features").type == pa.list_(pa.float32(), 192)
    keys, labels, feats, meta = read_features(r1["features"]["cls"], "val")
    assert feats.shape == (9, 192) and sorted(set(labels.tolist())) == [1, 2, 3]
    assert meta["model_version"] == v1 and meta["evaluation_set"] == h_cls and meta["feature_kind"] == "cls"
    _, _, probe_feats, probe_meta = read_features(r1["features"]["cls_last2"], "train")
    assert probe_feats.shape == (32, 384) and probe_meta["feature_kind"] == "cls_last2"

    # v2 (perfect) with if_better on the same evaluation set: it beats v1 -> champion moves
    knn_only = full.model_copy(update={"evaluations": ["knn"], "features_root": str(tmp_path / "feats")})
    tracking.set_registered_model_alias(name, "candidate", str(v2))
    r2 = dino_evaluate(f"models:/{name}@candidate", knn_only)  # the alias is pinned to v2
    assert r2["version"] == v2 and r2["evaluation_sets"]["classification"] == h_cls
    assert r2["metrics"]["knn20_top1"] == pytest.approx(100.0)
    assert r2["champion"]["moved"] and r2["champion"]["previous"] == v1
    assert r2["champion"]["previous_score"] == round(low, 2)
    assert tracking.get_model_version_by_alias(name, "champion").version == str(v2)

    # v3 (degenerate again): reevaluate picks only the version missing knn20_top1 on this set; not better -> stays.
    # v4 carries the score in the earlier tag layout (eval.<set hash>.<metric>): it has it, so it is skipped
    v3 = _register(name, tmp_path, degenerate=True)
    v4 = _register(name, tmp_path, degenerate=True)
    tracking.set_model_version_tag(name, str(v4), f"eval.{h_cls}.knn20_top1", repr(low))
    rr = dino_reevaluate(name, knn_only, missing_metric="knn20_top1")
    assert sorted(rr["evaluated"]) == [v3] and rr["missing_tag"] == f"eval.{n_cls}.knn20_top1"
    d3 = rr["evaluated"][v3]["champion"]
    assert not d3["moved"] and d3["previous"] == v2 and "not better" in d3["reason"]
    assert tracking.get_model_version_by_alias(name, "champion").version == str(v2)
    assert tracking.get_model_version(name, str(v3)).tags[f"eval.{n_cls}.knn20_top1"] == f"{low:.2f}"
    summary = _prefect_markdown(f"dino-reevaluate-{name}")
    assert f"Selected versions without k-NN 20 top-1 on `{n_cls}`" in summary and f"| v{v3} | evaluated" in summary
    assert f"champion unchanged: k-NN 20 top-1 {low:.2f} vs champion v{v2} 100.00: not better" in summary
    assert f"**Alias moves**: none; champion is v{v2}." in summary

    # the other policies
    assert not update_champion.fn(name, v3, "knn20_top1", n_cls, h_cls, low, "never")["moved"]
    assert update_champion.fn(name, v3, "knn20_top1", n_cls, h_cls, low, "always")["moved"]
    assert tracking.get_model_version_by_alias(name, "champion").version == str(v3)


def test_a_set_name_with_a_new_hash_drops_the_old_sets_scores(tracking):
    """Tags of a set name measured on other data or settings (another hash) are replaced, never mixed: a score
    left from the old set would read as one of the new set."""
    from tasks.evaluation import score_tags, tag_model_version

    name = f"retag-{secrets.token_hex(3)}"
    tracking.create_registered_model(name)
    version = int(tracking.create_model_version(name, "s3://nowhere/model").version)
    fam = {"knn20_top1": "classification", "linear_approx_best_top1": "classification"}
    tag_model_version.fn(name, version, score_tags({"knn20_top1": 70.0, "linear_approx_best_top1": 75.0}, fam,
                                                   {"classification": "a" * 12}, "RUN1", {"classification": "toy"}))
    # the same hash again, k-NN only: the probe's score stays (still measured on this set)
    tag_model_version.fn(name, version, score_tags({"knn20_top1": 71.0}, fam, {"classification": "a" * 12},
                                                   "RUN2", {"classification": "toy"}))
    tags = tracking.get_model_version(name, str(version)).tags
    assert tags["eval.toy.knn20_top1"] == "71.00" and tags["eval.toy.linear_approx_best_top1"] == "75.00"
    # another hash under the same name: the probe's old score goes
    tag_model_version.fn(name, version, score_tags({"knn20_top1": 50.0}, fam, {"classification": "b" * 12},
                                                   "RUN3", {"classification": "toy"}))
    tags = {k: v for k, v in tracking.get_model_version(name, str(version)).tags.items() if k.startswith("eval.")}
    assert tags == {"eval.toy.knn20_top1": "50.00", "eval.toy.set_hash": "b" * 12, "eval.toy.run_id": "RUN3"}


def _first_part(uri: str, split: str) -> bytes:
    from dino_model.eval.features import list_feature_files
    from dino_model.storage import open_store

    (_, key), *_ = list_feature_files(uri, split)
    return open_store(uri).get_bytes(key)


def test_bad_inputs_fail_before_heavy_work(toy, tracking, shared_data, tmp_path):
    from flows.evaluate import dino_evaluate
    from tasks.evaluation import (
        EvaluationInputError,
        EvaluationSettings,
        ModelVersionNotFound,
        check_evaluation_inputs,
        resolve_model_version,
    )

    name = f"bad-{secrets.token_hex(3)}"
    tracking.create_registered_model(name)
    feats = tmp_path / "feats"
    ok = dict(train_data=toy["train"], val_data=toy["val"], features_root=str(feats), **FAST)

    # unknown version: the flow stops at the first task; nothing extracted
    with pytest.raises(ModelVersionNotFound, match=rf"{name}.* has no version 99"):
        dino_evaluate(f"models:/{name}/99", EvaluationSettings(**ok))
    assert not feats.exists()
    with pytest.raises(ModelVersionNotFound, match="has no alias 'champion'"):
        resolve_model_version.fn(f"models:/{name}@champion")
    with pytest.raises(ModelVersionNotFound, match="does not exist"):
        resolve_model_version.fn("models:/no-such-model-xyz/1")
    with pytest.raises(ModelVersionNotFound, match="models:/<name>/<version>"):
        resolve_model_version.fn("runs:/abc/backbone")

    # classes in val missing from train (train and val swapped: class0 only in "val")
    with pytest.raises(EvaluationInputError, match=r"class\(es\) of .* have no training samples: class0"):
        check_evaluation_inputs.fn(EvaluationSettings(**{**ok, "train_data": toy["val"], "val_data": toy["train"]}))
    # empty evaluation set
    with pytest.raises(EvaluationInputError, match="val_data: .* holds no samples"):
        check_evaluation_inputs.fn(EvaluationSettings(**{**ok, "val_data": toy["empty"]}))

    # a DAVIS sequence without its first-frame mask, and one missing a later mask (label propagation needs all)
    davis = tmp_path / "davis"
    for sub in ("JPEGImages", "Annotations"):
        for seq in ("car-shadow", "kite-surf"):
            dst = davis / sub / "480p" / seq
            dst.mkdir(parents=True)
            for f in sorted((shared_data / "davis-mini" / sub / "480p" / seq).iterdir())[:3]:
                shutil.copy(f, dst / f.name)
    (davis / "Annotations/480p/car-shadow/00000.png").unlink()
    (davis / "Annotations/480p/kite-surf/00001.png").unlink()
    settings = EvaluationSettings(davis_root=str(davis), davis_sequences=["car-shadow", "kite-surf"], **FAST)
    with pytest.raises(EvaluationInputError) as err:
        check_evaluation_inputs.fn(settings)
    assert "'car-shadow' has no first-frame mask" in str(err.value)
    assert "'kite-surf' has no ground truth for frame(s) ['00001']" in str(err.value)

    # settings that cannot work are refused when built, naming the field
    with pytest.raises(ValueError, match="champion_metric 'knn7_top1'"):
        EvaluationSettings(**{**ok, "champion_metric": "knn7_top1"})
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvaluationSettings()
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        EvaluationSettings(**{**ok, "batch_size": 0})


def test_feature_count_mismatch_is_refused(toy, tmp_path):
    """Features whose row count differs from the shard set's samples (stale or partial extraction) are refused
    before any k-NN runs."""
    from dino_model.eval.features import FeatureRecipe, extract_features
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform
    from dino_model.models import build_backbone
    from tasks.evaluation import knn_scores

    backbone = build_backbone("vit_tiny", patch_size=16)
    out = str(tmp_path / "feats")
    train, val = EvalShardSet(toy["train"]), EvalShardSet(toy["val"])
    for split, shards, lmap in (("train", train, None), ("val", val, val.label_map_to(train.classes))):
        extract_features(backbone, shards.batches(16, lmap), out, split,
                         recipe=FeatureRecipe(EvalTransform(None, 32)), progress=False)
    assert knn_scores.fn(out, [1], expected={"train": 32, "val": 9})["knn1_top1"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="holds 9 feature rows but the val shard set has 12 samples"):
        knn_scores.fn(out, [1], expected={"train": 32, "val": 12})


def test_eval_shard_set_reads_everything_in_order(toy):
    from dino_model.eval.shard_source import EvalShardSet

    shards = EvalShardSet(toy["train"])
    batches = list(shards.batches(5))
    keys = [k for b in batches for k in b[0]]
    assert [len(b[0]) for b in batches] == [5] * 6 + [2]  # 32 samples, the remainder kept
    assert len(set(keys)) == 32 and keys == [k for k, _, _ in shards.samples()]
    assert all(im.dtype == torch.uint8 and im.shape == (3, 40, 40) for im in batches[0][1])
    val = EvalShardSet(toy["val"])
    assert val.classes == ["class1", "class2", "class3"]
    assert val.label_map_to(shards.classes).tolist() == [1, 2, 3]
    mapped = torch.cat([b[2] for b in val.batches(4, val.label_map_to(shards.classes))])
    assert sorted(set(mapped.tolist())) == [1, 2, 3]


def test_cli_extract_and_evaluate_errors(toy, tracking, tmp_path, capsys):
    """``dino extract`` on an export folder (the dino-extract flow, val labels mapped onto the training classes),
    and ``dino evaluate`` refusing an unknown version / bad settings with exit status 2."""
    from dino_model.eval.features import read_features
    from dino_model.export import export_backbone
    from dino_model.models import build_backbone
    from flows.cli import main

    export = tmp_path / "export"
    export_backbone(build_backbone("vit_tiny", patch_size=16), str(export), arch="vit_tiny", patch_size=16)
    out = tmp_path / "feats"
    rc = main(["extract", str(export), toy["val"], str(out), "--split", "val", "--classes-from", toy["train"],
               "--resize", "none", "--crop", "32", "--n-last-blocks", "2", "--avgpool"])
    assert rc == 0 and "9 x 576 cls_last2+avgpool features of split 'val'" in capsys.readouterr().out
    keys, labels, feats, meta = read_features(str(out), "val")
    assert feats.shape == (9, 576) and sorted(set(labels.tolist())) == [1, 2, 3]
    assert meta["model_uri"] == str(export) and meta["classes_from"] == toy["train"]

    assert main(["evaluate", "models:/no-such-model-cli/1", "--train", toy["train"], "--val", toy["val"],
                 "--features", str(tmp_path / "f2")]) == 2
    assert "registered model 'no-such-model-cli' does not exist" in capsys.readouterr().err
    assert main(["evaluate", "models:/x/1", "--train", toy["train"], "--val", toy["val"], "--ks", "5",
                 "--champion-metric", "knn20_top1"]) == 2
    assert "champion_metric 'knn20_top1' is not produced" in capsys.readouterr().err


def test_bf16_extraction_records_knn_parity_with_fp32(toy, tracking, tmp_path):
    """precision=bf16: the k-NN is also run on fp32 features of a bounded subset (first 16 training samples, every
    val sample) and the differences are recorded as metrics and version tags of the evaluation set."""
    from dino_model.eval.features import read_features
    from flows.evaluate import dino_evaluate
    from tasks.evaluation import EvaluationSettings, metric_family

    name = f"bf16-{secrets.token_hex(3)}"
    version = _register(name, tmp_path, degenerate=False)
    settings = EvaluationSettings(
        train_data=toy["train"], val_data=toy["val"], features_root=str(tmp_path / "feats"), evaluations=["knn"],
        knn_ks=[1, 20], precision="bf16", bf16_parity_train_samples=16, bf16_parity_val_samples=None,
        champion_policy="never", report=False, **FAST)
    res = dino_evaluate(f"models:/{name}/{version}", settings)
    m = res["metrics"]
    assert set(m) == {"knn1_top1", "knn20_top1", "knn1_top1_bf16_minus_fp32", "knn20_top1_bf16_minus_fp32"}
    # the toy classes are far apart: bf16 rounding changes no prediction, so both precisions agree exactly
    assert m["knn20_top1"] == pytest.approx(100.0) and m["knn20_top1_bf16_minus_fp32"] == 0.0
    assert read_features(res["features"]["cls"], "val")[3]["precision"] == "bf16"
    n = res["evaluation_set_names"]["classification"]
    tags = tracking.get_model_version(name, str(version)).tags
    assert tags[f"eval.{n}.knn1_top1_bf16_minus_fp32"] == f"{m['knn1_top1_bf16_minus_fp32']:.2f}"
    # fp32 (the reference) has no parity metric
    assert metric_family("knn20_top1_bf16_minus_fp32", settings.model_copy(update={"precision": "fp32"})) is None
    # each extraction checked bf16 against fp32 on its first batch: the evaluation run records the verdict
    run_tags = tracking.get_run(res["run_id"]).data.tags
    assert run_tags["fast_path.extract"] == "verified"
    assert float(run_tags["fast_path.extract.cls/val.min_cosine"]) > 0.99


def test_a_failing_bf16_extraction_falls_back_to_fp32_and_skips_the_parity(toy, tracking, tmp_path, monkeypatch):
    """The bf16 path returns shifted features (an injected fault): every extraction runs in fp32 instead, the
    evaluation run's tag says why, and the k-NN parity (bf16 vs fp32) is not measured: there is no bf16 feature."""
    from dino_model.eval.features import read_features
    from dino_model.fast_path.faults import FAULT_ENV
    from flows.evaluate import dino_evaluate
    from tasks.evaluation import EvaluationSettings

    monkeypatch.setenv(FAULT_ENV, "extract")
    name = f"bf16-fault-{secrets.token_hex(3)}"
    version = _register(name, tmp_path, degenerate=False)
    settings = EvaluationSettings(
        train_data=toy["train"], val_data=toy["val"], features_root=str(tmp_path / "feats"), evaluations=["knn"],
        knn_ks=[1], precision="bf16", champion_policy="never", **FAST)
    res = dino_evaluate(f"models:/{name}/{version}", settings)
    assert set(res["metrics"]) == {"knn1_top1"}  # no parity metric; no top-5 on a set of fewer than 10 classes
    assert read_features(res["features"]["cls"], "val")[3]["precision"] == "fp32"
    run = tracking.get_run(res["run_id"])
    assert run.data.tags["fast_path.extract"].startswith("fallback: cls/train: bf16 features differ from fp32")
    assert "cls/val: bf16 features differ" in run.data.tags["fast_path.extract"]
    assert run.data.params["fast_path.extract.path"] == "fp32"


def test_bf16_parity_warns_beyond_tolerance():
    from tasks.evaluation import EvaluationSettings, bf16_parity_metrics

    bf16 = {10: {"top1": 71.0, "top5": 90.0}, 20: {"top1": 72.4, "top5": 91.0}}
    fp32 = {10: {"top1": 70.8, "top5": 90.0}, 20: {"top1": 73.0, "top5": 91.2}}
    metrics, warnings = bf16_parity_metrics(bf16, fp32, tolerance=0.5)
    assert metrics == {"knn10_top1_bf16_minus_fp32": pytest.approx(0.2),
                       "knn20_top1_bf16_minus_fp32": pytest.approx(-0.6)}
    assert len(warnings) == 1 and "knn20_top1 differs by -0.60 points" in warnings[0] and "0.5 points" in warnings[0]
    assert bf16_parity_metrics(bf16, fp32, tolerance=1.0)[1] == []
    with pytest.raises(ValueError, match="bf16_parity_tolerance must be >= 0"):
        EvaluationSettings(train_data="a", val_data="b", bf16_parity_tolerance=-1)
    with pytest.raises(ValueError, match="bf16_parity_val_samples must be >= 1 or None"):
        EvaluationSettings(train_data="a", val_data="b", bf16_parity_val_samples=0)


@pytest.mark.slow
def test_register_export_and_reference_checkpoint_then_evaluate(toy, tracking, tmp_path, capsys):
    """``dino register`` an export folder and a facebookresearch/dino checkpoint (the same registration as
    dino-pretrain's), then ``dino evaluate`` the registered alias with ``--resize 48 --crop none``: the k-NN of the
    random ViT-Tiny separates the toy classes. The checkpoint's version holds the same weights as the backbone."""
    import argparse

    from dino_model.export import export_backbone, load_backbone
    from dino_model.models import build_backbone
    from flows.cli import main

    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=16).eval()
    export_backbone(backbone, str(tmp_path / "export"), arch="vit_tiny", patch_size=16)
    reference = {"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                 "args": argparse.Namespace(arch="vit_tiny", patch_size=16)}
    torch.save(reference, tmp_path / "checkpoint.pth")
    name = f"reg-{secrets.token_hex(3)}"

    assert main(["register", str(tmp_path / "export"), "--name", name]) == 0
    assert f"registered {name} version 1 (alias 'candidate')" in capsys.readouterr().out
    assert main(["register", str(tmp_path / "checkpoint.pth"), "--name", name, "--alias", "reference"]) == 0
    assert f"registered {name} version 2 (alias 'reference')" in capsys.readouterr().out
    v2 = tracking.get_model_version_by_alias(name, "reference")
    assert v2.tags["architecture"] == "vit_tiny/16" and v2.tags["source"] == str(tmp_path / "checkpoint.pth")
    assert tracking.get_run(v2.tags["mlflow_run_id"]).info.status == "FINISHED"
    x = torch.rand(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(load_backbone(f"models:/{name}@reference")(x), backbone(x), atol=1e-6)

    rc = main(["evaluate", f"models:/{name}@candidate", "--train", toy["train"], "--val", toy["val"], "--eval", "knn",
               "--ks", "1", "--resize", "48", "--crop", "none", "--features", str(tmp_path / "feats"),
               "--champion-policy", "never"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert re.search(r"knn1_top1\s+100\.00\b", out.out), out.out  # percent, 2 decimals
    assert "Traceback" not in out.err


def test_crop_larger_than_the_images_warns(toy, capsys):
    """``--resize none`` with the default 224 crop on 40-px images: most of each crop would be black padding."""
    from flows.cli.common import print_warnings
    from tasks.validation import EvaluationSettings, check_extraction_request, evaluation_inputs

    found = check_extraction_request(toy["val"], toy["train"], None, 224)
    assert len(found.warnings) == 1
    assert "the first is 40x40" in found.warnings[0] and "97% black" in found.warnings[0]
    assert "--resize 224" in found.warnings[0] and "--crop 40" in found.warnings[0]
    print_warnings("extract", found.warnings)
    assert capsys.readouterr().err.startswith("dino extract: warning: crop_size 224 is larger than the images")
    assert check_extraction_request(toy["val"], None, 256, 224).warnings == []
    assert check_extraction_request(toy["val"], None, None, 32).warnings == []
    assert "resize_size 64 is smaller than crop_size 224" in check_extraction_request(toy["val"], None, 64,
                                                                                        224).warnings[0]
    settings = EvaluationSettings(train_data=toy["train"], val_data=toy["val"], resize_size=None)
    assert "97% black" in evaluation_inputs(settings).warnings[0]


@pytest.mark.slow
def test_evaluate_extracts_features_on_a_dask_cluster(toy, tracking, mlflow_server, seaweedfs, tmp_path):
    """``settings.task_runner = tcp://...``: both feature kinds of k-NN and the fast probe are extracted as range
    tasks on a Dask cluster (workers that reach the MLflow registry through their own environment); the features
    and the k-NN scores are those of the in-process extraction."""
    import numpy as np

    from dino_model.eval.features import read_features
    from flows.evaluate import dino_evaluate
    from infra.services import start_dask_cluster
    from tasks.evaluation import EvaluationSettings

    name = f"toy-{secrets.token_hex(3)}"
    version = _register(name, tmp_path, degenerate=False)
    common = dict(train_data=toy["train"], val_data=toy["val"], evaluations=["knn", "linear_fast"],
                  linear_n_last_blocks=2, knn_ks=[1, 5], champion_policy="never", **FAST)
    local = dino_evaluate(f"models:/{name}/{version}",
                          EvaluationSettings(features_root=str(tmp_path / "local"), **common))
    cluster = start_dask_cluster(tmp_path / "dask", workers=2,
                                 env={**seaweedfs.env(), "MLFLOW_TRACKING_URI": mlflow_server.url})
    try:
        ranged = dino_evaluate(f"models:/{name}/{version}",
                               EvaluationSettings(features_root=str(tmp_path / "dask"), task_runner=cluster.address,
                                                  **common))
    finally:
        cluster.stop()
    assert sorted(ranged["features"]) == sorted(local["features"]) == ["cls", "cls_last2"]
    for kind in ("cls", "cls_last2"):
        for split in ("train", "val"):
            k1, l1, f1, _ = read_features(local["features"][kind], split)
            k2, l2, f2, _ = read_features(ranged["features"][kind], split)
            assert k2 == k1 and np.array_equal(l2, l1)
            np.testing.assert_allclose(f2, f1, rtol=1e-5, atol=1e-5)
    assert sorted(ranged["metrics"]) == sorted(local["metrics"])  # no top-5 on a set of fewer than 10 classes
    for metric in ("knn1_top1", "knn5_top1"):
        assert ranged["metrics"][metric] == local["metrics"][metric]

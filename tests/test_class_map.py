"""Where a shard set's class indices come from: an explicit source (``classes`` file, or the train shard set's
manifest via ``classes_from`` / ``--classes-from``), a loud warning when an ILSVRC val set falls back to the
classes of a partial label file, absolute paths and the class map's hash in the manifest, and the evaluation run
recording that it re-mapped val labels onto train's."""

from __future__ import annotations

import hashlib
import logging
import secrets

import pytest

from dino_model.data.manifest import class_map_sha256, load_manifest
from dino_model.data.shard_writer import ShardOptions, write_dataset
from dino_model.data.sources import ILSVRC_NUM_CLASSES, SourceSpec, check_source, scan_source
from tests.test_sources import SORTED, jpeg_bytes, make_val, write_loc_csv

EXTRA = "n00000001"  # a class train has and the partial val labels lack: it shifts every derived index
TRAIN_CLASSES = [EXTRA, *SORTED]


def make_train(tmp_path, per_class: int = 2) -> str:
    """An ImageFolder train set of TRAIN_CLASSES, sharded; returns the shard set's path."""
    root = tmp_path / "train-img"
    for c, wnid in enumerate(TRAIN_CLASSES):
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            (root / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(100 * c + i))
    dest = str(tmp_path / "train")
    write_dataset(scan_source(SourceSpec(str(root))), dest, ShardOptions(name="train", shard_size=4))
    return dest


def make_partial_val(tmp_path):
    """ILSVRC-style val images whose LOC csv covers only SORTED (3 classes), with no LOC_synset_mapping.txt."""
    truth = make_val(tmp_path / "val", n=6)
    csv = tmp_path / "labels" / "LOC_val_solution.csv"
    csv.parent.mkdir()
    write_loc_csv(csv, truth)
    return tmp_path / "val", csv, truth


def test_partial_val_labels_without_a_class_source_warn_and_say_so(tmp_path, monkeypatch, caplog):
    val, csv, truth = make_partial_val(tmp_path)
    monkeypatch.chdir(tmp_path)
    scan = scan_source(SourceSpec("val", labels="labels/LOC_val_solution.csv"))  # relative paths on purpose
    assert scan.classes == SORTED  # the labels' own classes: index 0 is not train's class 0
    assert len(scan.warnings) == 1
    warning = scan.warnings[0]
    assert "3 classes" in warning and "--classes-from" in warning and "--classes" in warning
    with caplog.at_level(logging.WARNING, logger="dino_model.data.shard_writer"):
        summary = write_dataset(scan, str(tmp_path / "out"), ShardOptions(name="val"))
    assert summary.warnings == [warning]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]
    manifest = load_manifest(str(tmp_path / "out"))
    assert manifest.warnings == [warning]
    inputs = manifest.inputs
    assert inputs["root"] == str(val) and inputs["labels"] == str(csv)  # absolute, whatever the caller gave
    assert inputs["class_map"] == {"source": "labels", "path": str(csv), "classes": 3,
                                   "sha256": class_map_sha256(SORTED)}
    assert manifest.classes_sha256 == hashlib.sha256("".join(f"{c}\n" for c in SORTED).encode()).hexdigest()


def test_classes_from_the_train_shard_set_gives_train_indices(tmp_path):
    train = make_train(tmp_path)
    val, csv, truth = make_partial_val(tmp_path)
    scan = scan_source(SourceSpec(str(val), labels=str(csv), classes_from=train))
    assert scan.classes == TRAIN_CLASSES and not scan.warnings
    assert all(TRAIN_CLASSES[it.label] == truth[it.key] for it in scan.items)
    write_dataset(scan, str(tmp_path / "out"), ShardOptions(name="val"))
    manifest, train_manifest = load_manifest(str(tmp_path / "out")), load_manifest(train)
    assert manifest.classes == train_manifest.classes and manifest.warnings == []
    class_map = manifest.inputs["class_map"]
    assert class_map["source"] == "shard-set" and class_map["path"].startswith("file:///")
    assert manifest.inputs["classes_from"] == class_map["path"]
    assert class_map["sha256"] == manifest.classes_sha256 == train_manifest.classes_sha256
    assert train_manifest.inputs["class_map"]["source"] == "folders"


def test_a_classes_file_and_the_synset_mapping_are_explicit_sources(tmp_path):
    val, csv, truth = make_partial_val(tmp_path)
    classes = tmp_path / "classes.txt"
    classes.write_text("".join(f"{w} name of {w}\n" for w in TRAIN_CLASSES))
    scan = scan_source(SourceSpec(str(val), labels=str(csv), classes=str(classes)))
    assert scan.classes == TRAIN_CLASSES and not scan.warnings
    assert scan.class_map.source == "classes-file" and scan.class_map.path == str(classes)
    assert scan.class_names[SORTED[0]] == f"name of {SORTED[0]}"
    (csv.parent / "LOC_synset_mapping.txt").write_text("".join(f"{w} words\n" for w in TRAIN_CLASSES))
    scan = scan_source(SourceSpec(str(val), labels=str(csv)))
    assert scan.classes == TRAIN_CLASSES and not scan.warnings and scan.class_map.source == "synset-mapping"


def test_labels_covering_every_ilsvrc_class_do_not_warn(tmp_path):
    truth = make_val(tmp_path / "val", n=3)
    rows = {**truth, **{f"missing_{i}": f"n{i:08d}" for i in range(ILSVRC_NUM_CLASSES - len(set(truth.values())))}}
    csv = tmp_path / "LOC_val_solution.csv"
    write_loc_csv(csv, rows)
    scan = scan_source(SourceSpec(str(tmp_path / "val"), labels=str(csv)))
    assert len(scan.classes) == ILSVRC_NUM_CLASSES and scan.class_map.source == "labels" and not scan.warnings


def test_imagefolder_subset_takes_train_indices(tmp_path):
    train = make_train(tmp_path)
    root = tmp_path / "val-img"
    (root / SORTED[1]).mkdir(parents=True)
    (root / SORTED[1] / "a.JPEG").write_bytes(jpeg_bytes(1))
    scan = scan_source(SourceSpec(str(root), classes_from=train))
    assert scan.classes == TRAIN_CLASSES and [it.label for it in scan.items] == [TRAIN_CLASSES.index(SORTED[1])]
    (root / "n99999999").mkdir()
    (root / "n99999999" / "b.JPEG").write_bytes(jpeg_bytes(2))
    with pytest.raises(ValueError, match=r"shard set .* lacks the class folders \['n99999999'\]"):
        scan_source(SourceSpec(str(root), classes_from=train))


def test_unusable_class_sources_fail_naming_the_option(tmp_path):
    val, csv, _ = make_partial_val(tmp_path)
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="classes and classes_from"):
        SourceSpec(str(val), labels=str(csv), classes=str(classes), classes_from=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"classes_from .*nowhere: no shard set there"):
        check_source(SourceSpec(str(val), labels=str(csv), classes_from=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"lists class id\(s\) \['a'\] more than once"):
        check_source(SourceSpec(str(val), labels=str(csv), classes=str(classes)))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.jpg").write_bytes(jpeg_bytes(0))
    write_dataset(scan_source(SourceSpec(str(flat))), str(tmp_path / "flat-shards"), ShardOptions(name="f"))
    with pytest.raises(ValueError, match="unlabelled images: it has no class map"):
        check_source(SourceSpec(str(val), labels=str(csv), classes_from=str(tmp_path / "flat-shards")))
    with pytest.raises(ValueError, match="flat folder of unlabelled images"):
        check_source(SourceSpec(str(flat), classes_from=str(tmp_path / "flat-shards")))


def warning_logs_of_prefect_runs() -> list[str]:
    """The WARNING (and worse) log lines Prefect's API recorded from flow and task runs: what the Prefect UI shows
    (read from the server, not from the process's logging handlers, which Prefect reconfigures as it starts)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(level=LogFilterLevel(ge_=logging.WARNING)), limit=200)
    return [log.message for log in logs]


def test_cli_classes_from_and_the_warning_in_the_summary(tmp_path, capsys):
    """``dino shard --classes-from``: train's indices; without it the partial val set warns in the log, the printed
    summary and the Prefect summary artifact."""
    from prefect.artifacts import Artifact

    from flows.cli import main

    train = make_train(tmp_path)
    val, csv, truth = make_partial_val(tmp_path)
    name = f"v{secrets.token_hex(3)}"
    rc = main(["shard", str(val), str(tmp_path / "warned"), "--labels", str(csv), "--name", name, "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0
    warned = load_manifest(str(tmp_path / "warned"))
    assert out.out.count("WARNING: class indices of") == 1 and warned.warnings[0] in out.out
    # the scan task's WARNING log line (Prefect's console handler may hold a stream capsys does not see)
    assert warned.warnings[0] in warning_logs_of_prefect_runs()
    assert warned.warnings[0] in Artifact.get(f"dino-shard-{name}-summary").data

    rc = main(["shard", str(val), str(tmp_path / "aligned"), "--labels", str(csv), "--classes-from", train,
               "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0 and "WARNING" not in out.out
    aligned = load_manifest(str(tmp_path / "aligned"))
    assert aligned.classes == TRAIN_CLASSES and aligned.inputs["class_map"]["source"] == "shard-set"

    rc = main(["shard", str(val), str(tmp_path / "x"), "--labels", str(csv), "--classes-from", str(tmp_path / "no")])
    assert rc == 2 and "classes_from" in capsys.readouterr().err


def test_evaluation_records_that_it_remapped(tmp_path, mlflow_server, monkeypatch):
    """The preflight aligns val to train by class id (as before) and the evaluation run says whether it re-mapped."""
    from mlflow.tracking import MlflowClient

    from tasks.evaluation import EvaluationSettings, check_evaluation_inputs, open_evaluation_run

    train = make_train(tmp_path)
    val, csv, _ = make_partial_val(tmp_path)
    for dest, extra in (("val-own", {}), ("val-train", {"classes_from": train})):
        write_dataset(scan_source(SourceSpec(str(val), labels=str(csv), **extra)), str(tmp_path / dest),
                      ShardOptions(name="val"))
    settings = dict(train_data=train, features_root=str(tmp_path / "features"), evaluations=["knn"])
    facts = check_evaluation_inputs.fn(EvaluationSettings(val_data=str(tmp_path / "val-own"), **settings))
    assert facts["label_map"] == [1, 2, 3]  # val's own indices 0..2 are train's 1..3
    assert facts["class_alignment"] == {
        "classes.val_to_train": "remapped", "classes.remapped": "3 of 3 val classes",
        "classes.train_sha256": class_map_sha256(TRAIN_CLASSES), "classes.val_sha256": class_map_sha256(SORTED)}
    same = check_evaluation_inputs.fn(EvaluationSettings(val_data=str(tmp_path / "val-train"), **settings))
    assert same["label_map"] == [0, 1, 2, 3] and same["class_alignment"]["classes.val_to_train"] == "identity"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    model = {"name": "m", "version": 1, "uri": "models:/m/1"}
    run_id = open_evaluation_run.fn(f"classes-{secrets.token_hex(3)}", model,
                                    EvaluationSettings(val_data=str(tmp_path / "val-own"), **settings),
                                    {"classification": "abc"}, "local", facts["class_alignment"])
    tags = MlflowClient(mlflow_server.url).get_run(run_id).data.tags
    assert tags["classes.val_to_train"] == "remapped" and tags["classes.remapped"] == "3 of 3 val classes"
    assert tags["classes.val_sha256"] == class_map_sha256(SORTED)

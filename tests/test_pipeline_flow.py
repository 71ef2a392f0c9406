"""The ``dino-pipeline`` flow end to end on CPU (shard → pretrain → evaluate in one run), with its data stages on
Prefect's process pool: a tiny ViT trained for one epoch, registered and scored against a real MLflow server."""

from __future__ import annotations

import json

import pytest

from tests.datasets import write_colour_set
from tests.test_pretrain_flow import TINY

pytestmark = pytest.mark.slow


def test_the_pipeline_runs_its_data_stages_on_the_chosen_task_runner(mlflow_server, monkeypatch, tmp_path):
    from flows.pipeline import dino_pipeline
    from tasks.validation import EvaluationSettings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    train = tmp_path / "train-img"
    val = tmp_path / "val-img"
    write_colour_set(train, tmp_path / "unused-train", range(4), 8, 0, "train")
    write_colour_set(val, tmp_path / "unused-val", range(4), 3, 1, "val")
    workspace = tmp_path / "run"
    evaluation = EvaluationSettings(
        evaluations=["knn"], train_data=f"{workspace}/shards/train", val_data=f"{workspace}/shards/val",
        features_root=f"{workspace}/features", resize_size=None, crop_size=32, batch_size=16, knn_ks=[5],
        champion_metric="knn5_top1", device="cpu", experiment="pipeline-test-evaluate",
    )

    out = dino_pipeline(train_source=str(train), val_source=str(val), workspace=str(workspace),
                        overrides=TINY + ["train.epochs=1"], shard_size=8, experiment="pipeline-test",
                        registered_model="pipeline-test", evaluation=evaluation, task_runner="processes",
                        parallelism=2)

    train_manifest = json.loads((workspace / "shards" / "train" / "manifest.json").read_text())
    val_manifest = json.loads((workspace / "shards" / "val" / "manifest.json").read_text())
    assert sum(s["samples"] for s in train_manifest["shards"]) == 32
    assert sum(s["samples"] for s in val_manifest["shards"]) == 12
    assert val_manifest["classes"] == train_manifest["classes"]  # val sharded with train's class map
    assert out["pretrain"]["final_step"] == 8 and out["pretrain"]["version"] >= 1
    # The evaluation ran its feature extraction on the pipeline's runner (its settings left the default).
    from mlflow.tracking import MlflowClient

    params = MlflowClient(mlflow_server.url).get_run(out["evaluation"]["run_id"]).data.params
    assert params["task_runner"] == "processes" and params["parallelism"] == "2"
    assert 0.0 <= out["evaluation"]["metrics"]["knn5_top1"] <= 100.0
    assert list((workspace / "features").rglob("*.parquet"))


def test_the_pipeline_refuses_a_bad_task_runner_in_its_first_task(tmp_path):
    from flows.pipeline import dino_pipeline
    from tasks.validation import PreflightError

    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(PreflightError) as info:
        dino_pipeline(train_source=str(tmp_path / "img"), val_source=str(tmp_path / "img"),
                      workspace=str(tmp_path / "run"), task_runner="threadz", parallelism=0)
    assert "task_runner must be one of threads" in str(info.value)
    assert "parallelism must be a positive integer" in str(info.value)
    assert not (tmp_path / "run").exists()

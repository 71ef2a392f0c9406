"""The ``dino-pipeline`` flow end to end on CPU (shard → pretrain → evaluate in one run): a tiny ViT trained for one
epoch, registered and scored. In-process with every optional parameter left to its default (the evaluation on the
workspace's shard sets and features: k-NN + the fast linear probe), against a real MLflow server; and as ``dino
pipeline`` (the console script in a fresh interpreter, ``MLFLOW_TRACKING_URI`` unset: the workspace's own MLflow
store). The request's checks, the evaluation settings' included, fail the first task, before anything is written;
the evaluation's task runner follows the pipeline's (the data stages on other runners: tests/test_task_runners.py).

The images are four classes of distinctly coloured noise, which any backbone (a random one, the same after a few
steps) tells apart: the k-NN scores exactly 100 % unless the chain (shards, class indices, features, labels) is
broken somewhere."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.datasets import write_colour_set
from tests.test_pretrain_flow import TINY

ONE_EPOCH = TINY + ["train.epochs=1"]  # 32 images, batch 4: 8 steps


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory) -> dict[str, Path]:
    """ImageFolders: train 4 classes x 8 images, val the same 4 classes x 3 images."""
    base = tmp_path_factory.mktemp("colour-images")
    write_colour_set(base / "train", base / "unused-train", range(4), 8, 0, "train")
    write_colour_set(base / "val", base / "unused-val", range(4), 3, 1, "val")
    return {"train": base / "train", "val": base / "val"}


def _shard_counts(workspace: Path) -> tuple[int, int, bool]:
    train = json.loads((workspace / "shards" / "train" / "manifest.json").read_text())
    val = json.loads((workspace / "shards" / "val" / "manifest.json").read_text())
    return (sum(s["samples"] for s in train["shards"]), sum(s["samples"] for s in val["shards"]),
            val["classes"] == train["classes"])


@pytest.mark.slow
def test_the_pipeline_evaluates_on_its_workspace_by_default(colour_images, mlflow_server, monkeypatch, tmp_path):
    """``evaluation`` left out (the flow's default, and its deployment's): the evaluation finds the shard sets the
    run wrote and puts its features beside them."""
    from mlflow.tracking import MlflowClient

    from dino_model.eval.features import read_features
    from flows.pipeline import dino_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    workspace = tmp_path / "run"
    model = f"pipeline-{secrets.token_hex(3)}"
    out = dino_pipeline(train_source=str(colour_images["train"]), val_source=str(colour_images["val"]),
                        workspace=str(workspace), overrides=ONE_EPOCH, shard_size=8, experiment=model,
                        registered_model=model)

    assert _shard_counts(workspace) == (32, 12, True)  # val sharded with train's class map
    trained, evaluated = out["pretrain"], out["evaluation"]
    assert trained["final_step"] == 8 and evaluated["version"] == trained["version"]
    client = MlflowClient(mlflow_server.url)
    params = client.get_run(evaluated["run_id"]).data.params
    # the workspace's sets and features, and the pipeline's runner (the settings left the default)
    assert (params["train_data"], params["val_data"], params["features_root"]) == (
        str(workspace / "shards" / "train"), str(workspace / "shards" / "val"), str(workspace / "features"))
    assert params["task_runner"] == "threads" and params["parallelism"] == "4"
    metrics = evaluated["metrics"]
    assert {"knn20_top1", "linear_approx_best_top1"} <= set(metrics)  # k-NN and the fast probe: the defaults
    assert metrics["knn20_top1"] == pytest.approx(100.0)
    _, train_labels, train_features, _ = read_features(evaluated["features"]["cls"], "train")
    _, val_labels, val_features, _ = read_features(evaluated["features"]["cls"], "val")
    assert evaluated["features"]["cls"].startswith(str(workspace / "features"))
    assert (train_features.shape[0], val_features.shape[0]) == (32, 12)
    assert sorted(train_labels.tolist()) == [c for c in range(4) for _ in range(8)]
    assert sorted(val_labels.tolist()) == [c for c in range(4) for _ in range(3)]
    version = client.get_model_version(model, str(trained["version"]))
    name = evaluated["evaluation_set_names"]["classification"]
    assert version.tags[f"eval.{name}.knn20_top1"] == "100.00"
    assert evaluated["champion"]["moved"] and evaluated["champion"]["previous"] is None  # the model's first version


@pytest.mark.slow
def test_dino_pipeline_runs_the_whole_pipeline_and_reports_it(colour_images, tmp_path):
    """``dino pipeline`` as a user runs it: its stage lines, the trainer's progress bar, the closing report; then
    what it recorded, read back from the workspace's MLflow store."""
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    sets = [arg for item in ONE_EPOCH for arg in ("--set", item)]
    done = subprocess.run([str(Path(sys.executable).with_name("dino")), "pipeline", str(colour_images["train"]),
                           str(colour_images["val"]), "ws", *sets, "--shard-size", "8", "--registered-model",
                           "cli-pipeline", "--parallelism", "2"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    stdout = done.stdout
    assert "2/4 sharding, 3/4 pretraining (progress below), 4/4 evaluating" in stdout
    assert "dino pretrain" in done.stderr and "8/8" in done.stderr and "loss=" in done.stderr  # the progress bar
    workspace = cwd / "ws"
    assert _shard_counts(workspace) == (32, 12, True)
    assert "shards:        ws/shards/train  (32 images), ws/shards/val" in stdout  # as the user named them
    assert "trained:       8 steps; MLflow run " in stdout
    assert "registered:    models:/cli-pipeline/1 (alias 'candidate')" in stdout
    assert "knn20_top1" in stdout and "linear_approx_best_top1" in stdout
    (knn_line,) = [line for line in stdout.splitlines() if line.startswith("knn20_top1 ")]
    assert knn_line.split()[1] == "100.00"
    assert "champion alias: moved to this version" in stdout
    db = workspace / "mlflow" / "mlflow.db"
    assert f"browse the runs: mlflow ui --backend-store-uri sqlite:///{db}" in stdout

    client = MlflowClient(f"sqlite:///{db}")
    version = client.get_model_version_by_alias("cli-pipeline", "champion")
    assert str(version.version) == "1" and version.tags["steps_done"] == "8"
    assert any(k.endswith(".knn20_top1") and v == "100.00" for k, v in version.tags.items())
    assert not (cwd / "mlruns-dino").exists()  # the pipeline's store is its workspace's


def test_the_pipeline_refuses_a_bad_request_in_its_first_task(tmp_path):
    from flows.pipeline import dino_pipeline
    from tasks.validation import PreflightError

    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    images = str(tmp_path / "img")
    with pytest.raises(PreflightError) as info:
        dino_pipeline(train_source=images, val_source=images, workspace=str(tmp_path / "run"), task_runner="threadz",
                      parallelism=0)
    assert "task_runner must be one of threads" in str(info.value)
    assert "parallelism must be a positive integer" in str(info.value)
    # Evaluation settings that cannot evaluate (a partial dict: the rest are the workspace's and the defaults):
    # refused with the rest, before the shards and the training, naming the field.
    with pytest.raises(PreflightError) as info:
        dino_pipeline(train_source=images, val_source=images, workspace=str(tmp_path / "run"),
                      evaluation={"champion_metric": "knn7_top1", "crop_size": 0})
    assert "evaluation.crop_size: crop_size must be >= 1 or None, got 0" in str(info.value)
    with pytest.raises(PreflightError, match=r"evaluation: evaluations \['davis'\] need davis_root"):
        dino_pipeline(train_source=images, val_source=images, workspace=str(tmp_path / "run"),
                      evaluation={"evaluations": ["davis"]})
    assert not (tmp_path / "run").exists()


def test_the_evaluation_runs_on_the_pipelines_task_runner_unless_its_settings_choose_one():
    from tasks.validation import EvaluationSettings
    from tasks.validation.pipeline import PipelineRequest

    def runner(evaluation) -> tuple[str, int, int]:
        settings = PipelineRequest("train", "val", "/ws", evaluation=evaluation, task_runner="processes",
                                   parallelism=3).evaluation_settings()
        return settings.task_runner, settings.parallelism, settings.nproc_per_node

    assert runner(None) == ("processes", 3, 1)
    assert runner({"crop_size": 64}) == ("processes", 3, 1)
    assert runner({"task_runner": "dask", "parallelism": 5}) == ("dask", 5, 1)  # a runner of its own
    assert runner({"nproc_per_node": 2}) == ("threads", 2, 2)  # torchrun processes: no task runner on top
    full = EvaluationSettings(train_data="/t", val_data="/v", evaluations=["knn"], knn_ks=[5])
    settings = PipelineRequest("train", "val", "/ws", evaluation=full).evaluation_settings()
    # what the settings chose stays; what they left out is the workspace's (features) and the pipeline's
    assert (settings.train_data, settings.knn_ks, settings.features_root) == ("/t", [5], "/ws/features")

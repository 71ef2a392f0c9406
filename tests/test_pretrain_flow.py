"""The ``dino-pretrain`` flow end to end on CPU: torchrun (gloo) training, a real MLflow server whose artifacts
live in a real SeaweedFS, model registration, a trainer killed mid-run and resumed by the retry, pre-flight
failures."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import psutil
import pytest

from dino_model.checkpoint import list_checkpoints
from infra.services import start_mlflow
from tests.datasets import write_colour_set

TINY = [
    "model.arch=vit_tiny",
    "model.out_dim=64",
    "model.head_hidden_dim=64",
    "model.head_bottleneck_dim=32",
    "crops.global_size=32",
    "crops.local_size=16",
    "crops.n_local=2",
    "data.batch_size_per_gpu=4",
    "data.num_workers=0",
    "optim.warmup_epochs=1",
    "train.device=cpu",
    "logging.log_every=1",
    "checkpoint.every_n_steps=2",
]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """32 noisy 40-px images in 4 classes, written as 4 shards."""
    return write_colour_set(tmp_path_factory.mktemp("tiny-images"), tmp_path_factory.mktemp("tiny-shards"),
                            range(4), 8, seed=0, name="tiny")


@pytest.fixture(scope="module")
def mlflow_on_s3(seaweedfs, tmp_path_factory):
    """An MLflow server (sqlite) whose proxied artifacts are stored in SeaweedFS; clients need no S3 credentials."""
    import boto3

    boto3.client("s3", endpoint_url=seaweedfs.url, aws_access_key_id=seaweedfs.access_key,
                 aws_secret_access_key=seaweedfs.secret_key, region_name="us-east-1").create_bucket(Bucket="mlflow")
    server = start_mlflow(tmp_path_factory.mktemp("mlflow-s3"), artifacts_destination="s3://mlflow/artifacts",
                          env=seaweedfs.env())
    yield server
    server.stop()


@pytest.fixture
def tracking(mlflow_on_s3, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_on_s3.url)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow_on_s3.url)


def _last_progress_description() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as prefect:
        (artifact,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
                                             sort=ArtifactSort.CREATED_DESC, limit=1)
    return artifact.description


def _steps(client, run_id, key="loss"):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.slow
def test_pretrain_two_processes_tracks_and_registers(tiny_shards, tracking, tmp_path):
    from flows.pretrain import dino_pretrain

    out = dino_pretrain(
        data=tiny_shards,
        checkpoint_uri=str(tmp_path / "ckpt"),
        preset="reference",
        overrides=TINY + ["train.epochs=2"],
        launch={"nproc_per_node": 2, "retries": 0},
        tracking={"experiment": "e2e", "registered_model": "dino-e2e"},
    )
    client = tracking
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == out["run_id"] and run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "vit_tiny" and run.data.params["crops.n_local"] == "2"
    assert run.data.tags["dataset_hash"] == out["dataset_hash"] and "git_commit" in run.data.tags
    # the trainer records its fast-path verdicts; on the CPU's defaults both paths are the reference itself
    assert run.data.tags["fast_path.data"] == run.data.tags["fast_path.step"] == "reference"
    assert run.data.params["fast_path.step.path"] == "eager, fp32, for-each optimiser"
    # 32 images, 2 ranks x batch 4 -> 4 steps per epoch, 2 epochs.
    assert sorted(_steps(client, run.info.run_id)) == list(range(1, 9))
    for key in ("lr", "wd", "momentum", "teacher_temp", "grad_norm", "images_per_s"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "config.json"} <= artifacts
    # logging.mlflow_checkpoints=none (the default): the run records where the checkpoints are, copies none.
    assert "checkpoints" not in artifacts
    assert run.data.tags["checkpoint"] == list_checkpoints(str(tmp_path / "ckpt"))[-1][1]
    assert run.data.tags["checkpoint_uri"] == str(tmp_path / "ckpt")
    outcome = {"steps_done": "8", "steps_total": "8", "epochs_done": "2", "stop_reason": "completed"}
    assert {k: run.data.tags.get(k) for k in outcome} == outcome
    mv = client.get_model_version_by_alias("dino-e2e", "candidate")
    assert int(mv.version) == out["version"] == 1
    assert mv.tags["dataset_hash"] == out["dataset_hash"] and mv.tags["architecture"] == "vit_tiny/16"
    assert {k: mv.tags.get(k) for k in outcome} == outcome and mv.tags["epochs"] == "2"
    # the machines (from the trainer's start record), the model card, the registered model's description, the
    # experiment marked as model training
    assert run.data.tags["hardware"] == "2 processes on cpu, fp32, global batch 8"
    assert run.data.tags["dataset_samples"] == "32"
    card = mv.description
    assert card.startswith("not evaluated yet · DINO vit_tiny/16 trained on ")
    assert "- **hardware**: 2 processes on cpu, fp32, global batch 8" in card
    assert f"hash `{out['dataset_hash'][:12]}`" in card and "32 samples" in card
    assert "- **training**: 2 of 2 epochs · 8 of 8 steps · stop reason: completed" in card
    assert "Not evaluated yet" in card
    assert "**candidate** (now v1)" in client.get_registered_model("dino-e2e").description
    assert client.get_experiment_by_name("e2e").tags["mlflow.experimentKind"] == "custom_model_development"
    # the Prefect progress card ends with where training stopped: step x/y, epoch, loss, speed, time left, status
    assert re.fullmatch(r"step 8/8 \(100\.0 %\) · epoch 2/2 · loss \d+\.\d{4} · [\d,]+ img/s · ETA 0 s · completed",
                        _last_progress_description())

    from dino_model.export import load_backbone
    import torch

    backbone = load_backbone("models:/dino-e2e@candidate")
    assert backbone(torch.zeros(2, 3, 48, 48)).shape == (2, 192)  # any input size, not a frozen export


@pytest.mark.slow
def test_killed_trainer_is_resumed_by_the_retry(tiny_shards, tracking, tmp_path):
    from flows.pretrain import dino_pretrain

    ckpt = str(tmp_path / "ckpt")
    killed = {}

    def kill_rank0_after_first_checkpoint():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not list_checkpoints(ckpt):
            time.sleep(0.2)
        for p in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "dino_model.train" in cmd and "torch.distributed.run" not in cmd:
                killed["step"] = max(s for s, _ in list_checkpoints(ckpt))
                os.kill(p.pid, signal.SIGKILL)
                return

    watcher = threading.Thread(target=kill_rank0_after_first_checkpoint, daemon=True)
    watcher.start()
    out = dino_pretrain(
        data=tiny_shards,
        checkpoint_uri=ckpt,
        overrides=TINY + ["train.epochs=3", "logging.mlflow_checkpoints=last"],
        launch={"nproc_per_node": 1, "retries": 1},
        tracking={"experiment": "killed", "registered_model": "dino-killed"},
    )
    watcher.join()
    assert "step" in killed, "the watcher never found the trainer to kill"
    client = tracking
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = _steps(client, runs[0].info.run_id)
    assert len(steps) == len(set(steps)), "a step was logged twice after the resume"
    # 32 images, batch 4 -> 8 steps per epoch, 3 epochs; the retry continued from the checkpoint, not step 0.
    assert max(steps) == 24 and out["final_step"] == 24
    assert max(s for s, _ in list_checkpoints(ckpt)) == 24
    # logging.mlflow_checkpoints=last: a copy of the checkpoint the run ended with, and only that one.
    copies = [a.path for a in client.list_artifacts(runs[0].info.run_id, "checkpoints")]
    assert copies == ["checkpoints/checkpoint-000000024.pt"]


def test_preflight_rejects_bad_parameters_before_launching(tiny_shards, tracking, tmp_path):
    from flows.pretrain import dino_pretrain
    from tasks.validation import PreflightError

    with pytest.raises(PreflightError, match="optim.lr"):
        dino_pretrain(data=tiny_shards, checkpoint_uri=str(tmp_path / "c"), overrides=TINY + ["optim.lr=-1"])
    with pytest.raises(PreflightError, match="neither manifest.json"):
        dino_pretrain(data=str(tmp_path), checkpoint_uri=str(tmp_path / "c"), overrides=TINY)
    with pytest.raises(PreflightError, match="cannot feed"):
        dino_pretrain(data=tiny_shards, checkpoint_uri=str(tmp_path / "c"), overrides=TINY + ["data.num_workers=4"],
                      launch={"nproc_per_node": 2})
    with pytest.raises(PreflightError, match="holds no checkpoint"):
        dino_pretrain(data=tiny_shards, checkpoint_uri=str(tmp_path / "c"), overrides=TINY, resume="require")
    assert not (tmp_path / "c").exists() or not list_checkpoints(str(tmp_path / "c"))


def test_preflight_reports_unreachable_services(tiny_shards, monkeypatch, tmp_path):
    from flows.pretrain import dino_pretrain
    from tasks.validation import PreflightError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(PreflightError) as info:
        dino_pretrain(data=tiny_shards, checkpoint_uri="s3://nowhere/ckpt", overrides=TINY)
    message = str(info.value)
    assert "mlflow: tracking server http://127.0.0.1:9 is not reachable" in message
    assert "checkpoint:" in message and "cannot reach" in message

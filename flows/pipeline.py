"""The ``dino-pipeline`` flow: shard → pretrain → evaluate, each stage its own (sub)flow, in one run.

    dino pipeline /data/train /data/val s3://bucket/run1 --preset small --set train.epochs=20
    dino demo                  # the same on a small generated dataset, embedded MLflow, no servers

Every stage is idempotent, so re-running the pipeline after a failure skips finished shards, resumes training from
its latest checkpoint, and re-evaluates the newly registered version.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from flows.evaluate import dino_evaluate
from flows.pretrain import dino_pretrain
from flows.shard import dino_shard
from tasks.evaluation import EvaluationSettings
from tasks.pipeline import check_pipeline


@flow(name="dino-pipeline", log_prints=True)
def dino_pipeline(
    train_source: str,
    val_source: str,
    workspace: str,
    preset: str = "reference",
    overrides: list[str] | None = None,
    shard_size: int = 1000,
    nproc_per_node: int = 1,
    experiment: str = "dino-pretrain",
    registered_model: str = "dino-backbone",
    evaluation: EvaluationSettings | None = None,
    resume: Literal["auto", "never", "require"] = "auto",
    task_runner: str = "threads",
    parallelism: int = 4,
) -> dict[str, Any]:
    """Shard ``train_source`` and ``val_source`` (ImageFolder trees, ILSVRC layouts or flat folders) under
    ``workspace`` (local folder or ``s3://`` prefix), pretrain on the train shards, register the teacher, and
    evaluate it (k-NN and the fast linear probe on the val shards by default; attention maps and DAVIS label
    propagation when ``evaluation.davis_root`` is set).

    Args:
        train_source: images to pretrain on (and the k-NN memory bank).
        val_source: labelled images to evaluate on (same classes as train).
        workspace: where ``shards/train``, ``shards/val``, ``checkpoints`` and ``features`` go.
        preset: training preset(s), see ``dino-pretrain``.
        overrides: training config overrides ``section.field=value``.
        shard_size: samples per shard.
        nproc_per_node: training processes on this worker.
        experiment: MLflow experiment of the training run.
        registered_model: MLflow registered model receiving the new version.
        evaluation: evaluation settings; ``train_data``/``val_data``/``features_root`` default to the workspace's.
        resume: checkpoint policy of the training stage.
        task_runner: where the shard tasks and the evaluation's feature extraction run: ``threads`` (of the flow's
            process), ``processes`` (of its machine), ``dask`` (a local Dask cluster of ``parallelism`` workers)
            or ``tcp://HOST:PORT`` (a running Dask scheduler). An ``evaluation`` with a task runner of its own
            (other than ``threads``) keeps it.
        parallelism: shard tasks at once, and the workers of ``processes`` / ``dask``.
    """
    # First task: the whole request checked (the checks `dino pipeline` runs before Prefect starts).
    check_pipeline(train_source, val_source, workspace, preset, overrides, shard_size, nproc_per_node,
                   registered_model, evaluation, resume, task_runner, parallelism)
    root = workspace.rstrip("/")
    train_shards, val_shards = f"{root}/shards/train", f"{root}/shards/val"
    runner = {"task_runner": task_runner, "parallelism": parallelism}
    dino_shard(source=train_source, destination=train_shards, name="train", shard_size=shard_size, **runner)
    # val gets train's class indices (the evaluation aligns them by class id anyway; this keeps them equal)
    dino_shard(source=val_source, destination=val_shards, name="val", shard_size=shard_size, classes_from=train_shards,
               **runner)
    trained = dino_pretrain(
        data=train_shards,
        checkpoint_uri=f"{root}/checkpoints",
        preset=preset,
        overrides=overrides,
        nproc_per_node=nproc_per_node,
        experiment=experiment,
        registered_model=registered_model,
        resume=resume,
    )
    settings = (evaluation or EvaluationSettings()).model_copy()
    settings.train_data = settings.train_data or train_shards
    settings.val_data = settings.val_data or val_shards
    if settings.features_root == EvaluationSettings.model_fields["features_root"].default:
        settings.features_root = f"{root}/features"
    if settings.task_runner == "threads" and settings.nproc_per_node == 1:
        settings.task_runner, settings.parallelism = task_runner, parallelism
    evaluated = dino_evaluate(model=f"models:/{registered_model}/{trained['version']}", settings=settings)
    return {"train_shards": train_shards, "val_shards": val_shards, "pretrain": trained, "evaluation": evaluated}

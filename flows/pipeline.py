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
from flows.shard import shard_stage
from tasks.evaluation import EvaluationSettings
from tasks.flow_parameters import over_deployment_group
from tasks.pipeline import check_pipeline
from tasks.validation.pipeline import PipelineRequest
from tasks.validation.pretrain_settings import LaunchSettings, TrackingSettings
from tasks.validation.settings_groups import RunnerSettings


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
    evaluation: EvaluationSettings | dict[str, Any] | None = None,
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
        evaluation: evaluation settings (:class:`tasks.evaluation.EvaluationSettings`), all or some of them: the
            fields left out take the workspace's shard sets (``train_data``, ``val_data``) and features
            (``features_root``), then the defaults (k-NN and the fast linear probe). In a deployment run, a partial
            dict changes only its own fields of the deployment's ``evaluation``. Settings that cannot evaluate
            fail the flow's first task.
        resume: checkpoint policy of the training stage.
        task_runner: where the shard tasks and the evaluation's feature extraction run: ``threads`` (of the flow's
            process), ``processes`` (of its machine), ``dask`` (a local Dask cluster of ``parallelism`` workers)
            or ``tcp://HOST:PORT`` (a running Dask scheduler). An ``evaluation`` with a task runner of its own
            (other than ``threads``) keeps it.
        parallelism: shard tasks at once, and the workers of ``processes`` / ``dask``.
    """
    request = PipelineRequest(train_source, val_source, workspace, preset, tuple(overrides or ()), shard_size,
                              nproc_per_node, experiment, registered_model,
                              over_deployment_group("evaluation", evaluation), resume, task_runner, parallelism)
    # First task: the whole request checked (the checks `dino pipeline` runs before Prefect starts), each shard
    # stage's source and the evaluation's settings included: the stages do not check them again.
    check_pipeline(request)
    layout, stages = request.layout, request.shard_requests()
    runner = RunnerSettings(task_runner=task_runner, parallelism=parallelism)
    shard_stage(stages["train"], runner)
    shard_stage(stages["val"], runner)
    trained = dino_pretrain(
        data=layout.train_shards,
        checkpoint_uri=layout.checkpoints,
        preset=preset,
        overrides=overrides,
        resume=resume,
        val_data=layout.val_shards,  # the learning curve during training: the teacher's k-NN on the val shards
        launch=LaunchSettings(nproc_per_node=nproc_per_node),
        tracking=TrackingSettings(experiment=experiment, registered_model=registered_model),
    )
    evaluated = dino_evaluate(model=f"models:/{registered_model}/{trained['version']}",
                              settings=request.evaluation_settings())
    return {"train_shards": layout.train_shards, "val_shards": layout.val_shards, "pretrain": trained,
            "evaluation": evaluated}


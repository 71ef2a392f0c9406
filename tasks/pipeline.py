"""The Prefect task that opens ``dino-pipeline``: the whole request checked before the first stage starts.

Its checks are :func:`tasks.validation.pipeline.check_pipeline_request`, which ``dino pipeline`` and ``dino demo``
run before Prefect starts; here they fail a deployment run in its first task, with the same message, instead of
after the shards are written.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.validation.evaluation_settings import EvaluationSettings
from tasks.validation.pipeline import check_pipeline_request


@task(name="check-pipeline-request", cache_policy=NO_CACHE)
def check_pipeline(
    train_source: str,
    val_source: str,
    workspace: str,
    preset: str,
    overrides: list[str] | None,
    shard_size: int,
    nproc_per_node: int,
    registered_model: str,
    evaluation: EvaluationSettings | None,
    resume: str,
    task_runner: str = "threads",
    parallelism: int = 4,
) -> None:
    """Raise :class:`tasks.validation.PreflightError` listing every problem of the pipeline's parameters."""
    check_pipeline_request(train_source, val_source, workspace, preset, overrides, shard_size, nproc_per_node,
                           registered_model, evaluation, resume, task_runner, parallelism)

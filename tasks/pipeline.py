"""The Prefect task that opens ``dino-pipeline``: the whole request checked before the first stage starts.

Its checks are :func:`tasks.validation.pipeline.check_pipeline_request`, which ``dino pipeline`` and ``dino demo``
run before Prefect starts; here they fail a deployment run in its first task, with the same message, instead of
after the shards are written.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.validation.pipeline import PipelineRequest, check_pipeline_request


@task(name="check-pipeline-request", cache_policy=NO_CACHE)
def check_pipeline(request: PipelineRequest) -> None:
    """Raise :class:`tasks.validation.PreflightError` listing every problem of the pipeline's parameters."""
    check_pipeline_request(request)

"""What every stage of the evaluation tasks shares: the two input errors and the run logger."""

from __future__ import annotations

import logging

from prefect import get_run_logger


class EvaluationInputError(ValueError):
    """The evaluation inputs are unusable (checked before any heavy work); the message lists every problem."""


class ModelVersionNotFound(ValueError):
    """The registered model, version or alias does not exist in the MLflow registry."""


def run_logger():
    """The Prefect run logger inside a flow/task run, a plain logger when a task's ``.fn`` is called directly."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("tasks.evaluation")

"""What every stage of the evaluation tasks shares: the two input errors (from :mod:`tasks.validation.errors`)
and the run logger."""

from __future__ import annotations

import logging

from prefect import get_run_logger

# Defined with the Prefect-free checks that raise them too (the dino command runs those before Prefect starts).
from tasks.validation.errors import EvaluationInputError, ModelVersionNotFound

__all__ = ["EvaluationInputError", "ModelVersionNotFound", "run_logger"]


def run_logger():
    """The Prefect run logger inside a flow/task run, a plain logger when a task's ``.fn`` is called directly."""
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - MissingContextError outside a run
        return logging.getLogger("tasks.evaluation")

"""The evaluation settings and the device to run on.

:class:`EvaluationSettings`, :func:`metric_family` and :func:`version_tag` live in
:mod:`tasks.validation.evaluation_settings` (Prefect-free, so the ``dino`` command validates settings before
Prefect starts); they are re-exported here for the tasks and flows."""

from __future__ import annotations

from tasks.validation.evaluation_settings import (
    CLASSIFICATION,
    EVALUATIONS,
    SET_HASH,
    VIDEO,
    EvaluationSettings,
    metric_family,
    set_hash_tag,
    set_name_problem,
    version_tag,
)

from .common import EvaluationInputError

__all__ = ["CLASSIFICATION", "EVALUATIONS", "SET_HASH", "VIDEO", "EvaluationSettings", "metric_family",
           "resolve_device", "set_hash_tag", "set_name_problem", "version_tag"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this worker has a GPU, else ``cpu``; a CUDA device on a worker without one is an
    :class:`EvaluationInputError` (its syntax is checked earlier, by :mod:`tasks.validation.evaluation_inputs`)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationInputError(f"device is {device!r} but this worker has no CUDA GPU: use --device cpu (or auto)")
    return device

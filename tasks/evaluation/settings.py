"""The evaluation settings and the device to run on.

:class:`EvaluationSettings`, :func:`metric_family` and :func:`version_tag` live in
:mod:`tasks.validation.evaluation_settings` (Prefect-free, so the ``dino`` command validates settings before
Prefect starts); they are re-exported here for the tasks and flows, with :func:`with_deployment_defaults`, which
puts the fields a deployment run sets onto the deployment's own settings."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from tasks.validation.evaluation_settings import (
    CLASSIFICATION,
    EVALUATIONS,
    SET_HASH,
    VIDEO,
    EvaluationSettings,
    describe_validation_error,
    metric_family,
    set_hash_tag,
    set_name_problem,
    version_tag,
)

from .common import EvaluationInputError

__all__ = ["CLASSIFICATION", "EVALUATIONS", "SET_HASH", "VIDEO", "EvaluationSettings", "merge_settings",
           "metric_family", "resolve_device", "set_hash_tag", "set_name_problem", "version_tag",
           "with_deployment_defaults"]


def merge_settings(defaults: dict[str, Any] | None,
                   settings: EvaluationSettings | dict[str, Any] | None) -> EvaluationSettings:
    """The fields ``settings`` sets — the keys of a dict, the fields an :class:`EvaluationSettings` was given
    explicitly (pydantic's ``model_fields_set``) — over ``defaults``; the other fields keep the defaults' values,
    then the class's. An invalid result is an :class:`EvaluationInputError` naming the field (a user error)."""
    if isinstance(settings, EvaluationSettings):
        if not defaults:
            return settings
        explicit = settings.model_dump(include=settings.model_fields_set)
    else:
        explicit = dict(settings or {})
    try:
        return EvaluationSettings.model_validate({**(defaults or {}), **explicit})
    except ValidationError as e:
        raise EvaluationInputError(f"settings: {describe_validation_error(e)}") from None


def with_deployment_defaults(settings: EvaluationSettings | dict[str, Any] | None,
                             parameter: str = "settings") -> EvaluationSettings:
    """A deployment run's ``settings`` merged onto its deployment's (:func:`merge_settings`).

    Prefect merges a run's parameters with its deployment's only at the top level, so ``prefect deployment run
    dino-evaluate/default --param settings='{"crop_size": 64}'`` would otherwise replace the deployment's whole
    ``settings`` block (its shard sets, features root, champion policy...) by one holding only ``crop_size`` (the
    flows therefore accept a partial dict too). Outside a deployment the settings are used as they are."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    defaults = None
    try:
        if deployment.id:  # (prefect.runtime.deployment.parameters are the run's, not the deployment's)
            with get_client(sync_client=True) as client:
                defaults = (client.read_deployment(deployment.id).parameters or {}).get(parameter)
    except Exception:  # noqa: BLE001 - no deployment, or no server to ask: nothing to merge onto
        defaults = None
    return merge_settings(defaults if isinstance(defaults, dict) else None, settings)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when this worker has a GPU, else ``cpu``; a CUDA device on a worker without one is an
    :class:`EvaluationInputError` (its syntax is checked earlier, by :mod:`tasks.validation.evaluation_inputs`)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationInputError(f"device is {device!r} but this worker has no CUDA GPU: use --device cpu (or auto)")
    return device

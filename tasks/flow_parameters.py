"""The Prefect side of grouped flow parameters (:mod:`tasks.validation.settings_groups`): the deployment's own
parameters, a flow whose deprecated flat parameter names still validate, and the groups resolved with their
deprecation warnings in the flow run's log.

A flow with groups declares ``**deprecated`` for the flat names it had before and is made with
:func:`grouped_flow` instead of ``@flow``: a deployment run that passes ``--param nproc_per_node=2`` (or a deployment
made before the groups, which stores such names) reaches the flow as ``deprecated={"nproc_per_node": 2}``, where
plain Prefect would refuse a parameter that is not in the signature.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Mapping

from prefect import Flow
from tasks.validation.settings_groups import Renamed, SettingsGroup, resolve_groups


class GroupedParameterFlow(Flow):
    """A Prefect flow that validates parameters missing from its signature as its ``**kwargs`` (the deprecated flat
    names), so a deployment run may still pass them at the top level."""

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        signature = inspect.signature(self.fn).parameters
        variadic = next(name for name, p in signature.items() if p.kind is p.VAR_KEYWORD)
        return super().validate_parameters(collapse_flat_parameters(parameters, signature, variadic))


def collapse_flat_parameters(parameters: Mapping[str, Any], signature: Mapping[str, Any],
                             variadic: str) -> dict[str, Any]:
    """``parameters`` with every name that is not in ``signature`` moved into the ``variadic`` dict (merged with
    what it holds already)."""
    known = {k: v for k, v in parameters.items() if k in signature}
    flat = {k: v for k, v in parameters.items() if k not in signature}
    if flat:
        known[variadic] = {**(known.get(variadic) or {}), **flat}
    return known


def grouped_flow(**options: Any) -> Callable[[Callable], GroupedParameterFlow]:
    """``@flow(**options)`` for a flow with settings groups and ``**deprecated`` flat names."""

    def make(fn: Callable) -> GroupedParameterFlow:
        return GroupedParameterFlow(fn=fn, **options)

    return make


def deployment_parameters(deployment_id: Any = None) -> dict[str, Any] | None:
    """The parameters stored with a deployment: ``deployment_id``'s, or by default those of the deployment that
    started this flow run (None for a subflow run, a run outside a deployment, or with no server to ask).

    Prefect merges a run's parameters with these only at the top level, so the flows merge their groups onto them
    themselves (:func:`resolve_flow_groups`)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    try:
        if deployment_id is None:
            context = FlowRunContext.get()
            deployment_id = context.flow_run.deployment_id if context and context.flow_run else None
        if deployment_id is None:
            return None
        with get_client(sync_client=True) as client:
            return dict(client.read_deployment(deployment_id).parameters or {})
    except Exception:  # noqa: BLE001 - no deployment, or no server to ask: nothing to merge onto
        return None


def resolve_flow_groups(groups: Mapping[str, type[SettingsGroup]], given: Mapping[str, Any],
                        deprecated: Mapping[str, Any], renames: Mapping[str, Renamed]) -> dict[str, SettingsGroup]:
    """:func:`tasks.validation.settings_groups.resolve_groups` inside a flow run, onto the parameters of the
    deployment that started it; each deprecated flat name used is logged as a warning in the run's log (and raised
    as a :class:`DeprecationWarning`)."""
    resolved, notes = resolve_groups(groups, given, deprecated, renames, deployment_parameters())
    for note in notes:
        warnings.warn(note, DeprecationWarning, stacklevel=3)
        _run_logger().warning("%s", note)
    return resolved


def _run_logger():
    import logging

    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tasks.flow_parameters")

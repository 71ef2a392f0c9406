"""The Prefect side of grouped flow parameters (:mod:`tasks.validation.settings_groups`): a flow whose deprecated
flat parameter names still reach it, the deployment's own parameters, and the groups resolved with their
deprecation warnings in the flow run's log.

A flow with groups declares ``**deprecated`` for the flat names it had before and is made with
:func:`grouped_flow` instead of ``@flow``. Prefect binds a flow run's stored parameters to the function's signature
before it validates them (a deployment made before the groups stores ``nproc_per_node: 1``; so does a run created
through the API with that name), and refuses a name the signature lacks. So the signature Prefect binds against
(the function's ``__signature__``) lists the flat names as keyword-only parameters, ``None`` meaning not given; the
signature the flow's parameter schema is built from (the run form, a new deployment's schema) leaves them out, so
the form shows the groups only. (``prefect deployment run`` itself refuses names the deployment's stored schema
lacks: on a deployment made from today's ``prefect.yaml`` only the groups pass it.)
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Iterable, Mapping

from prefect import Flow
from pydantic import BaseModel

from tasks.validation.settings_groups import Renamed, SettingsGroup, resolve_groups


class GroupedParameterFlow(Flow):
    """A Prefect flow that takes the deprecated flat names :func:`grouped_flow` added to its function's signature;
    a name not given (``None``) is left out of the flow run's parameters."""

    flat_names: frozenset[str] = frozenset()

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        validated = super().validate_parameters(parameters)
        return {k: v for k, v in validated.items() if not (k in self.flat_names and v is None)}


def grouped_flow(flat_names: Iterable[str], **options: Any) -> Callable[[Callable], GroupedParameterFlow]:
    """``@flow(**options)`` for a function with settings groups and ``**deprecated``: ``flat_names`` are the
    deprecated names it still takes (see the module docstring)."""

    def make(fn: Callable) -> GroupedParameterFlow:
        declared = inspect.signature(fn)
        public = declared.replace(parameters=[p for p in declared.parameters.values() if p.kind is not p.VAR_KEYWORD])
        flat = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Any)
                for name in flat_names]
        fn.__signature__ = public  # the flow's parameter schema (Prefect builds it when the flow is made)
        flow = GroupedParameterFlow(fn=fn, **options)
        flow.flat_names = frozenset(p.name for p in flat)
        fn.__signature__ = public.replace(parameters=[*public.parameters.values(), *flat])  # what Prefect binds
        return flow

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


def over_deployment_group(name: str, given: BaseModel | dict[str, Any] | None) -> BaseModel | dict[str, Any] | None:
    """In a flow run started by a deployment, the fields ``given`` sets (a model's explicit fields, a dict's keys)
    over the deployment's own parameter ``name`` (a dict), as a dict left for the flow to validate (its defaults
    may come from other parameters); elsewhere, or when the deployment stores no such dict, ``given`` as it is."""
    return over_group((deployment_parameters() or {}).get(name), given)


def over_group(stored: Any, given: BaseModel | dict[str, Any] | None) -> BaseModel | dict[str, Any] | None:
    """The fields ``given`` sets (a model's explicit fields, a dict's keys) over ``stored`` when it is a dict (a
    deployment's parameter); ``given`` as it is otherwise."""
    if not isinstance(stored, dict):
        return given
    if isinstance(given, BaseModel):
        return {**stored, **given.model_dump(include=given.model_fields_set)}
    return {**stored, **(given or {})}


def given_flat_names(parameters: Mapping[str, Any], renames: Mapping[str, Renamed]) -> dict[str, Any]:
    """The deprecated flat names among ``parameters`` that were given (``None``: not given)."""
    return {k: v for k, v in parameters.items() if k in renames and v is not None}


def resolve_flow_groups(groups: Mapping[str, type[SettingsGroup]], given: Mapping[str, Any],
                        deprecated: Mapping[str, Any], renames: Mapping[str, Renamed]) -> dict[str, SettingsGroup]:
    """:func:`tasks.validation.settings_groups.resolve_groups` inside a flow run, onto the parameters of the
    deployment that started it; each deprecated flat name given is logged as a warning in the run's log (and
    raised as a :class:`DeprecationWarning`)."""
    resolved, notes = resolve_groups(groups, given, given_flat_names(deprecated, renames), renames,
                                     deployment_parameters())
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

"""``dino-pretrain``'s groups of settings (:mod:`tasks.validation.pretrain_settings`) resolved inside a flow run:
merged onto the deployment's own (:mod:`tasks.flow_parameters`), the deprecated flat names moved into their group
with a warning in the run's log. Also what the flow's hooks need of them (the MLflow experiment), read back from
a flow run's stored parameters."""

from __future__ import annotations

from typing import Any, Mapping

from tasks.flow_parameters import collapse_flat_parameters, deployment_parameters, resolve_flow_groups
from tasks.validation.pretrain_settings import (
    PRETRAIN_GROUPS,
    PRETRAIN_RENAMES,
    PretrainSettings,
    TrackingSettings,
)
from tasks.validation.settings_groups import resolve_groups


def pretrain_settings(given: Mapping[str, Any], deprecated: Mapping[str, Any]) -> PretrainSettings:
    """The flow's groups (``given``: parameter name -> the value the flow received) and deprecated flat names,
    resolved (:func:`tasks.flow_parameters.resolve_flow_groups`)."""
    return PretrainSettings(**resolve_flow_groups(PRETRAIN_GROUPS, given, deprecated, PRETRAIN_RENAMES))


def tracking_of(flow_fn, flow_run) -> TrackingSettings:
    """The ``tracking`` settings a flow run of ``flow_fn`` ran with, from its stored parameters and its
    deployment's (what the flow's hooks read: they get the flow run, not the flow's values)."""
    import inspect

    signature = inspect.signature(flow_fn).parameters
    variadic = next(name for name, p in signature.items() if p.kind is p.VAR_KEYWORD)
    params = collapse_flat_parameters(flow_run.parameters or {}, signature, variadic)
    groups, _ = resolve_groups(PRETRAIN_GROUPS, {name: params.get(name) for name in PRETRAIN_GROUPS},
                               params.get(variadic) or {}, PRETRAIN_RENAMES,
                               deployment_parameters(flow_run.deployment_id))
    return groups["tracking"]

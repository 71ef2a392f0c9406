"""``dino-pretrain``'s groups of settings (:mod:`tasks.validation.pretrain_settings`) resolved inside a flow run:
merged onto the deployment's own (:mod:`tasks.flow_parameters`), the deprecated flat names moved into their group
with a warning in the run's log. Also what the flow's hooks need of them (the MLflow experiment), read back from
a flow run's stored parameters."""

from __future__ import annotations

from typing import Any, Mapping

from tasks.flow_parameters import deployment_parameters, given_flat_names, resolve_flow_groups
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


def tracking_of(flow_run) -> TrackingSettings:
    """The ``tracking`` settings a flow run of ``dino-pretrain`` ran with, from its stored parameters (the groups,
    or the deprecated flat names) and its deployment's: what the flow's hooks read (they get the flow run, not the
    flow's values)."""
    params = flow_run.parameters or {}
    groups, _ = resolve_groups(PRETRAIN_GROUPS, params, given_flat_names(params, PRETRAIN_RENAMES), PRETRAIN_RENAMES,
                               deployment_parameters(flow_run.deployment_id))
    return groups["tracking"]

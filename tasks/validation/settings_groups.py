"""Grouped flow parameters: a flow takes its optional settings as a few typed groups (pydantic models, e.g.
``dino-pretrain``'s ``launch`` and ``kubernetes``), so the Prefect run form shows one section per group and a
deployment run changes one field with a partial dict::

    prefect deployment run dino-pretrain/default --param launch='{"nproc_per_node": 8}'

Prefect merges a run's parameters with its deployment's at the top level only, so that dict would replace the
deployment's whole ``launch`` group; :func:`resolve_groups` puts it back onto the deployment's group instead (as
``dino-evaluate``'s ``settings`` always did, :mod:`tasks.evaluation.settings`).

The flat names the groups replaced (``nproc_per_node``, ``k8s_image`` ...) keep working for now: a flow takes them
as ``**deprecated`` keyword arguments (:mod:`tasks.flow_parameters` lets a deployment run pass them at the top level)
and :func:`resolve_groups` moves each into its group, with a deprecation warning naming the new spelling. Order,
later wins: the group's defaults; the deployment's group; the deployment's flat names (a deployment made before the
groups); the run's group (only the fields it sets); the run's flat names.

Prefect-free, like all of :mod:`tasks.validation`: the ``dino`` command builds the same groups before Prefect starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserInputError
from .task_runners import check_parallelism, check_task_runner


class SettingsGroup(BaseModel):
    """One group of a flow's parameters: every field typed and described (the run form shows the descriptions);
    a misspelt field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RunnerSettings(SettingsGroup):
    """Where a flow's parallel tasks run (``dino-shard``'s shard tasks, ``dino-extract``'s range tasks)."""

    task_runner: str = Field("threads", description="'threads' (of the flow's process), 'processes' (of its "
                             "machine), 'dask' (a local Dask cluster of `parallelism` workers) or 'tcp://HOST:PORT' "
                             "(a running Dask scheduler).")
    parallelism: int = Field(4, description="Tasks at once: the threads, processes or local Dask workers of the "
                             "task runner (a tcp:// scheduler's own workers decide there).")

    @field_validator("task_runner")
    @classmethod
    def _known_runner(cls, value: str) -> str:
        return check_task_runner(value)

    @field_validator("parallelism")
    @classmethod
    def _positive(cls, value: int) -> int:
        return check_parallelism(value)


@dataclass(frozen=True)
class Renamed:
    """Where a deprecated flat parameter went: ``group.field``."""

    group: str
    field: str

    def spelling(self, value: Any) -> str:
        """The new spelling of ``--param <flat>=<value>``."""
        return f"{self.group}.{self.field} (--param {self.group}='{json.dumps({self.field: value})}')"


def describe_error(group: str, error: ValidationError) -> str:
    """A pydantic error on group ``group`` as one line naming each dotted field: ``launch.nnodes: ...; ...``."""
    return "; ".join(f"{'.'.join([group, *map(str, err['loc'])])}: {err['msg'].removeprefix('Value error, ')}"
                     for err in error.errors())


def explicit_fields(value: BaseModel | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields ``value`` sets: a dict's keys, or the fields a model was given explicitly (``model_fields_set``:
    a field given its class default still counts, a field left out does not)."""
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        return value.model_dump(include=value.model_fields_set)
    return dict(value)


def resolve_groups(
    groups: Mapping[str, type[SettingsGroup]],
    given: Mapping[str, BaseModel | Mapping[str, Any] | None],
    deprecated: Mapping[str, Any],
    renames: Mapping[str, Renamed],
    deployment: Mapping[str, Any] | None = None,
) -> tuple[dict[str, SettingsGroup], list[str]]:
    """Each group of ``groups`` (name -> class) built from, later winning: the class defaults, ``deployment``'s
    group and flat names (a deployment's stored parameters; None outside a deployment), ``given[name]`` (only the
    fields it sets) and the run's own flat names in ``deprecated`` (those whose value is not just the
    deployment's, which Prefect merged in). Returns the groups and one warning per flat name used, naming its new
    spelling. An unknown flat name or a bad value is a :class:`UserInputError` naming the field."""
    deployment = deployment or {}
    unknown = sorted(set(deprecated) - set(renames))
    if unknown:
        raise UserInputError(f"unknown parameter(s) {', '.join(unknown)}: the flow takes "
                             f"{', '.join(groups)} (groups of settings) and the flat names {', '.join(renames)}")
    from_deployment = {k: v for k, v in deployment.items() if k in renames}
    from_run = {k: v for k, v in deprecated.items() if k not in from_deployment or from_deployment[k] != v}
    layers: dict[str, dict[str, Any]] = {name: {} for name in groups}
    for name in groups:
        layers[name].update(explicit_fields(deployment.get(name)))
    for flat, value in from_deployment.items():
        layers[renames[flat].group][renames[flat].field] = value
    for name in groups:
        layers[name].update(explicit_fields(given.get(name)))
    for flat, value in from_run.items():
        layers[renames[flat].group][renames[flat].field] = value
    resolved = {}
    for name, cls in groups.items():
        try:
            resolved[name] = cls.model_validate(layers[name])
        except ValidationError as e:
            raise UserInputError(describe_error(name, e)) from None
    used = {**from_deployment, **from_run}
    notes = [f"parameter {flat!r} is deprecated: use {renames[flat].spelling(value)}" for flat, value in used.items()]
    return resolved, notes

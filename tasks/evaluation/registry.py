"""The MLflow model registry side of an evaluation: pin a ``models:/`` URI to one version, and list the versions
that ``dino-reevaluate`` should evaluate."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.validation.models import parse_model_uri
from tasks.validation.registry import find_model_version, require_registered_model

from .common import run_logger

__all__ = ["find_versions_to_evaluate", "logged_model_id", "parse_model_uri", "resolve_model_version"]


def logged_model_id(mv) -> str | None:
    """The LoggedModel behind a model version: ``mv.model_id`` where the client fills it in, else the id in its
    ``models:/m-...`` source (MLflow 3.17's REST client leaves ``model_id`` empty)."""
    if getattr(mv, "model_id", None):
        return mv.model_id
    m = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", mv.source or "")
    return m.group(1) if m else None


@task(name="resolve-model-version", cache_policy=NO_CACHE)
def resolve_model_version(model: str) -> dict[str, Any]:
    """Pin ``model`` (an alias or a version of a registered model) to one version, so an alias moving during the
    evaluation changes nothing. Raises :class:`ModelVersionNotFound` naming the model, version or alias."""
    mv = find_model_version(model)
    name = mv.name
    info = {"name": name, "version": int(mv.version), "uri": f"models:/{name}/{mv.version}",
            "model_id": logged_model_id(mv), "run_id": mv.run_id, "tags": dict(mv.tags or {}),
            "aliases": list(getattr(mv, "aliases", []) or [])}
    run_logger().info("evaluating %s (from %s)", info["uri"], model)
    return info


@task(name="find-versions-to-evaluate", cache_policy=NO_CACHE)
def find_versions_to_evaluate(registered_model: str, missing: dict[str, str] | None = None,
                              versions: list[int] | None = None) -> list[int]:
    """Versions of ``registered_model`` (ascending) to evaluate: all of them (or those in ``versions``), keeping
    only, when ``missing`` (``{"metric", "set_name", "set_hash"}``) is given, those without that score on that
    evaluation set — in the version tags ``eval.<set name>.<metric>`` under the same ``eval.<set name>.set_hash``,
    or the earlier layout ``eval.<set hash>.<metric>`` (:func:`tasks.evaluation.recording.recorded_score`)."""
    from .recording import recorded_score

    found = []
    for mv in require_registered_model(registered_model, versions):
        if versions and int(mv.version) not in versions:
            continue
        if missing and recorded_score(dict(mv.tags or {}), missing["set_name"], missing["set_hash"],
                                      missing["metric"]) is not None:
            continue
        found.append(int(mv.version))
    found.sort()
    what = (f" (missing {missing['metric']} on {missing['set_name']}, set hash {missing['set_hash']})"
            if missing else "")
    run_logger().info("%d version(s) of %s to evaluate%s: %s", len(found), registered_model, what, found)
    return found

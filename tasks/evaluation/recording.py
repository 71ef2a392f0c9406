"""Where scores are recorded: the MLflow evaluation run (params, metrics linked to the LoggedModel), the model
version's ``eval.<set hash>.<metric>`` tags, a Prefect table artifact, and the ``champion`` alias policy."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from ..tracking import flatten, get_or_create_experiment
from .common import run_logger
from .settings import EvaluationSettings, version_tag

#: Tag on the evaluation run that ties it to the Prefect flow run (a retried flow reuses the run).
FLOW_RUN_TAG = "prefect.flow_run_id"
#: The alias moved to the best version.
CHAMPION_ALIAS = "champion"
POLICIES = ("always", "if_better", "never")


@task(name="open-evaluation-run", cache_policy=NO_CACHE)
def open_evaluation_run(experiment: str, model: dict[str, Any], settings: EvaluationSettings,
                        hashes: dict[str, str], flow_run_id: str,
                        class_alignment: dict[str, str] | None = None) -> str:
    """The MLflow run of this evaluation (found again by its flow-run tag when the flow is retried), tagged with
    the model version, the evaluation-set hashes and how val labels were aligned with train's
    (``class_alignment``: the ``classes.*`` tags of :func:`tasks.evaluation.preflight.class_alignment`), with the
    settings as params."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = get_or_create_experiment(client, experiment)
    if flow_run_id != "local":
        found = client.search_runs([exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    tags = {FLOW_RUN_TAG: flow_run_id, "model_name": model["name"], "model_version": str(model["version"]),
            "model_uri": model["uri"], **{f"evalset.{k}": v for k, v in hashes.items()}, **(class_alignment or {})}
    if model.get("run_id"):
        tags["training_run_id"] = model["run_id"]
    run = client.create_run(exp_id, run_name=f"eval-{model['name']}-v{model['version']}", tags=tags)
    params = [Param(k, v[:6000]) for k, v in flatten(settings.model_dump()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    run_logger().info("MLflow evaluation run %s in experiment %r", run.info.run_id, experiment)
    return run.info.run_id


@task(name="record-fast-path", cache_policy=NO_CACHE)
def record_fast_path(run_id: str, part: str, records: dict[str, dict[str, Any]]) -> str:
    """The fast-path verdicts of the evaluation's extractions (``{"cls/train": Verdict.as_record(), ...}``)
    combined into one (:func:`dino_model.fast_path.verdict.combine`), as tags and params of the evaluation run:
    ``fast_path.<part>`` = ``verified`` / ``fallback: <which>: <reason>`` / ``reference`` / ``off``, plus the
    figures. Params already logged by an earlier attempt are kept (MLflow params cannot change); tags hold the
    latest. Returns the combined verdict."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    from dino_model.fast_path.verdict import Verdict, combine, tracking_records

    verdict = combine(part, {label: Verdict.from_record(part, r) for label, r in records.items()})
    values = tracking_records({part: verdict.as_record()})
    client = MlflowClient()
    logged = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in values.items() if k not in logged]
    tags = [RunTag(k, v) for k, v in values.items()]
    for i in range(0, max(len(params), len(tags)), 100):
        client.log_batch(run_id, params=params[i:i + 100], tags=tags[i:i + 100])
    if verdict.fell_back:
        run_logger().warning("fast path %s: %s", part, verdict.text)
    return verdict.text


@task(name="log-evaluation-metrics", cache_policy=NO_CACHE)
def log_evaluation_metrics(run_id: str, metrics: dict[str, float], model_id: str | None = None) -> None:
    """The scores as metrics of the evaluation run, linked to the version's LoggedModel when it has one (MLflow 3
    then lists them on the logged model and records it as the run's input)."""
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, run_id=run_id, model_id=model_id,
                       synchronous=True)


@task(name="tag-model-version", cache_policy=NO_CACHE)
def tag_model_version(name: str, version: int, tags: dict[str, str]) -> None:
    """Set ``tags`` on the model version (open-source MLflow versions hold tags, not metrics)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def score_tags(metrics: dict[str, float], families: dict[str, str], hashes: dict[str, str], run_id: str,
               sets: dict[str, str]) -> dict[str, str]:
    """The version tags for ``metrics``: ``eval.<H>.<metric>`` (``repr`` of the float, exact round trip), plus
    ``eval.<H>.run_id`` and ``eval.<H>.set`` for each evaluation set used."""
    tags = {version_tag(hashes[families[m]], m): repr(float(v)) for m, v in metrics.items()}
    for fam in sorted(set(families.values())):
        tags[f"eval.{hashes[fam]}.run_id"] = run_id
        tags[f"eval.{hashes[fam]}.set"] = sets[fam][:4000]
    return tags


@task(name="publish-scores", cache_policy=NO_CACHE)
def publish_scores(model: dict[str, Any], metrics: dict[str, float], families: dict[str, str],
                   hashes: dict[str, str], run_id: str) -> str:
    """A Prefect table artifact of the scores; returns its key."""
    slug = re.sub(r"[^a-z0-9-]+", "-", model["name"].lower()).strip("-") or "model"
    key = f"dino-evaluate-{slug}-v{model['version']}"
    rows = [{"metric": m, "value": round(float(v), 4), "evaluation set": hashes[families[m]],
             "approximate": m.startswith("linear_approx_")} for m, v in sorted(metrics.items())]
    create_table_artifact(rows, key=key, description=f"Scores of {model['uri']} (MLflow run {run_id})")
    return key


@task(name="update-champion", cache_policy=NO_CACHE)
def update_champion(name: str, version: int, metric: str, set_hash: str | None, score: float | None,
                    policy: str = "if_better", higher_is_better: bool = True) -> dict[str, Any]:
    """Move alias ``champion`` to ``version`` according to ``policy``:

    * ``always``: move it;
    * ``if_better``: move it when there is no champion yet, or when ``score`` beats the champion's score for
      ``metric`` on the same evaluation set (tag ``eval.<set_hash>.<metric>``); a champion without a score on
      this set keeps the alias (it must be re-evaluated on this set first — ``dino-reevaluate`` does that);
    * ``never``: leave it.

    Returns the decision: ``moved``, ``reason``, ``previous`` (version or None), ``previous_score``, ``score``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if policy not in POLICIES:
        raise ValueError(f"champion policy must be one of {POLICIES}, got {policy!r}")
    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        current = None
    previous = int(current.version) if current is not None else None
    decision: dict[str, Any] = {"moved": False, "previous": previous, "previous_score": None, "score": score,
                                "metric": metric, "policy": policy}
    if policy == "never":
        decision["reason"] = "policy is 'never'"
    elif previous == version:
        decision["reason"] = f"v{version} already is the champion"
    elif policy == "always":
        decision.update(moved=True, reason="policy is 'always'")
    elif score is None or set_hash is None:
        raise ValueError(f"policy 'if_better' needs a score for {metric!r}, none was computed")
    elif current is None:
        decision.update(moved=True, reason="no champion yet")
    else:
        raw = (current.tags or {}).get(version_tag(set_hash, metric))
        if raw is None:
            decision["reason"] = (f"champion v{previous} has no {metric} on evaluation set {set_hash}: re-evaluate "
                                  "it before comparing")
        else:
            prev = float(raw)
            decision["previous_score"] = prev
            better = score > prev if higher_is_better else score < prev
            decision.update(moved=better, reason=f"{metric} {score:.4f} vs champion v{previous} {prev:.4f}: "
                                                  f"{'better' if better else 'not better'}")
    if decision["moved"]:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    run_logger().info("champion: %s (%s)", f"moved to v{version}" if decision["moved"] else "unchanged",
                   decision["reason"])
    return decision


@task(name="end-evaluation-run", cache_policy=NO_CACHE)
def end_evaluation_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the evaluation run FINISHED or FAILED."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)

"""Where scores are recorded: the MLflow evaluation run (params, inputs, metrics linked to the model and the data
set), the model version's ``eval.<set name>.<metric>`` tags, the Prefect score table, and the ``champion`` alias
policy. The tag layout and how older tags are read are in :func:`score_tags` and :func:`recorded_score`."""

from __future__ import annotations

import re
import time
import warnings
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from dino_model.eval.score_names import display, is_fraction_metric, label, ordered, rounded

from ..model_card import version_page
from ..tracking import flatten, get_or_create_experiment, mlflow_ui_link
from .common import run_logger
from .settings import SET_HASH, EvaluationSettings, set_hash_tag, version_tag

#: Tag on the evaluation run that ties it to the Prefect flow run (a retried flow reuses the run).
FLOW_RUN_TAG = "prefect.flow_run_id"
#: Tag on the evaluation run naming the LoggedModel it created to stand for the evaluated version.
RUN_MODEL_TAG = "evaluated_model.run_model_id"
#: The alias moved to the best version.
CHAMPION_ALIAS = "champion"
POLICIES = ("always", "if_better", "never")
#: Metrics recorded on the evaluation run but not as version tags (one per DAVIS sequence: dozens on DAVIS-2017).
_RUN_ONLY = re.compile(r"davis_seq_.+")


def is_version_tag_metric(metric: str) -> bool:
    """Whether ``metric`` is recorded as a version tag (per-sequence DAVIS scores live on the run only)."""
    return not _RUN_ONLY.fullmatch(metric)


def evaluation_run_name(model: dict[str, Any], evaluations: list[str], names: dict[str, str]) -> str:
    """What the run evaluates: ``dino-backbone-v3 knn+linear_fast on imagenette-128-val``."""
    sets = " + ".join(dict.fromkeys(names.values())) or "?"
    # no quote: the name goes into a search filter (uniqueness check), which has no escapes
    return f"{model['name']}-v{model['version']} {'+'.join(evaluations)} on {sets}".replace("'", "")


@task(name="open-evaluation-run", cache_policy=NO_CACHE)
def open_evaluation_run(experiment: str, model: dict[str, Any], settings: EvaluationSettings,
                        hashes: dict[str, str], flow_run_id: str,
                        class_alignment: dict[str, str] | None = None,
                        names: dict[str, str] | None = None) -> str:
    """The MLflow run of this evaluation (found again by its flow-run tag when the flow is retried), named by what
    it evaluates (model, version, evaluations, sets; ``(2)``, ``(3)`` ... when that name is taken in the
    experiment, so no two runs share a name), tagged with the model version, the evaluation sets (names and
    hashes) and how val labels were aligned with train's (``class_alignment``: the ``classes.*`` tags of
    :func:`tasks.evaluation.preflight.class_alignment`), with the settings as params."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp_id = get_or_create_experiment(client, experiment)
    if flow_run_id != "local":
        found = client.search_runs([exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    names = names or {}
    tags = {FLOW_RUN_TAG: flow_run_id, "model_name": model["name"], "model_version": str(model["version"]),
            "model_uri": model["uri"], **{f"evalset.{k}": v for k, v in hashes.items()},
            **{f"evalset.{k}.name": v for k, v in names.items()}, **(class_alignment or {})}
    if model.get("run_id"):
        tags["training_run_id"] = model["run_id"]
    base = evaluation_run_name(model, settings.selected(), names)
    run_name, n = base, 1
    while client.search_runs([exp_id], filter_string=f"attributes.run_name = '{run_name}'", max_results=1):
        n += 1
        run_name = f"{base} ({n})"
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    params = [Param(k, v[:6000]) for k, v in flatten(settings.model_dump()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    run_logger().info("MLflow evaluation run %r (%s) in experiment %r", run_name, run.info.run_id, experiment)
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


def _dataset(uri: str, name: str, digest: str):
    """An MLflow dataset record (no data: a name, a digest and where the data is)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # a local path matches two equivalent local sources: either is right
        warnings.simplefilter("ignore", UserWarning)
        return MetaDataset(resolve_dataset_source(uri), name=name, digest=digest)


def evaluation_datasets(facts: dict[str, Any], names: dict[str, str], hashes: dict[str, str],
                        davis_root: str | None) -> dict[str, dict[str, str]]:
    """The data sets of an evaluation, as ``{role: {"uri", "name", "digest", "context"}}``: ``classification``
    (the val shard set, named and hashed as the evaluation set its scores belong to), ``train`` (the k-NN memory
    bank / probe training set) and ``video`` (the DAVIS folder)."""
    out: dict[str, dict[str, str]] = {}
    sets = facts.get("classification_datasets") or {}
    if "classification" in hashes and "val" in sets:
        out["classification"] = {"uri": sets["val"]["uri"], "name": names["classification"],
                                 "digest": hashes["classification"], "context": "validation"}
        out["train"] = {"uri": sets["train"]["uri"], "name": sets["train"]["name"],
                        "digest": sets["train"]["digest"], "context": "training"}
    if "video" in hashes and davis_root:
        out["video"] = {"uri": str(davis_root), "name": names["video"], "digest": hashes["video"],
                        "context": "validation"}
    return out


@task(name="link-evaluation-run", cache_policy=NO_CACHE)
def link_evaluation_run(run_id: str, model: dict[str, Any], facts: dict[str, Any], names: dict[str, str],
                        hashes: dict[str, str], davis_root: str | None = None) -> dict[str, Any]:
    """Record what the run evaluated: the data sets (:func:`evaluation_datasets`) as run inputs (the UI's Dataset
    column), the version's LoggedModel as a model input, and a LoggedModel of the evaluation experiment standing
    for the evaluated version (named ``<model>-v<version>``, output of this run: MLflow 3.17's run table fills its
    Model column only from models a run outputs). Returns ``{"model_ids": [version's, stand-in's], "datasets"}``
    (the stand-in is reused when the flow is retried)."""
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, LoggedModelOutput
    from mlflow.tracking import MlflowClient

    datasets = evaluation_datasets(facts, names, hashes, davis_root)
    client = MlflowClient()
    run = client.get_run(run_id)
    existing = run.data.tags.get(RUN_MODEL_TAG)
    if existing:
        return {"model_ids": [model.get("model_id"), existing], "datasets": datasets}
    inputs = [DatasetInput(_dataset(d["uri"], d["name"], d["digest"])._to_mlflow_entity(),
                           tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets.values()]
    client.log_inputs(run_id, datasets=inputs or None,
                      models=[LoggedModelInput(model["model_id"])] if model.get("model_id") else None)
    tags = {"registered_model": model["name"], "registered_version": str(model["version"]),
            "model_uri": model["uri"]}
    if model.get("model_id"):
        tags["registered_model_id"] = model["model_id"]
    stand_in = client.create_logged_model(run.info.experiment_id, name=f"{model['name']}-v{model['version']}",
                                          source_run_id=run_id, tags=tags,
                                          model_type="registered version (evaluated)")
    client.finalize_logged_model(stand_in.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(stand_in.model_id, step=0)])
    client.set_tag(run_id, RUN_MODEL_TAG, stand_in.model_id)
    return {"model_ids": [model.get("model_id"), stand_in.model_id], "datasets": datasets}


@task(name="log-evaluation-metrics", cache_policy=NO_CACHE)
def log_evaluation_metrics(run_id: str, metrics: dict[str, float], model_ids: list[str | None] | str | None = None,
                           families: dict[str, str] | None = None,
                           datasets: dict[str, dict[str, str]] | None = None) -> None:
    """The scores (percent, 2 decimals like the tags) as metrics of the evaluation run, each linked to the models
    in ``model_ids`` (the version's LoggedModel and the run's stand-in: MLflow lists them on those models) and to
    the data set of its family (the LoggedModel page's Dataset column)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    ids = [model_ids] if isinstance(model_ids, str) or model_ids is None else list(model_ids)
    ids = list(dict.fromkeys(i for i in ids if i)) or [None]
    now = int(time.time() * 1000)
    batch = []
    for key, value in metrics.items():
        ds = (datasets or {}).get((families or {}).get(key, ""))
        for model_id in ids:
            batch.append(Metric(key, rounded(value), now, 0, run_id=run_id, model_id=model_id,
                                dataset_name=ds["name"] if ds else None, dataset_digest=ds["digest"] if ds else None))
    client = MlflowClient()
    for i in range(0, len(batch), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=batch[i : i + 1000], synchronous=True)


@task(name="tag-model-version", cache_policy=NO_CACHE)
def tag_model_version(name: str, version: int, tags: dict[str, str]) -> None:
    """Set ``tags`` on the model version (open-source MLflow versions hold tags, not metrics). When ``tags`` set
    ``eval.<set name>.set_hash`` to another hash than the version holds (the same name now stands for other data
    or settings), every earlier ``eval.<set name>.*`` tag is deleted first, so no score of the old set remains
    under the new hash; the earlier evaluation run keeps them."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    current = dict(client.get_model_version(name, str(version)).tags or {})
    for key, new_hash in tags.items():
        m = re.fullmatch(r"eval\.(.+)\.set_hash", key)
        if not m or current.get(key) in (None, new_hash):
            continue
        prefix = f"eval.{m.group(1)}."
        stale = [k for k in current if k.startswith(prefix)]
        run_logger().warning("%s v%s: set %r now has hash %s (was %s): its %d earlier tags are replaced", name,
                             version, m.group(1), new_hash, current[key], len(stale))
        for k in stale:
            client.delete_model_version_tag(name, str(version), k)
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def score_tags(metrics: dict[str, float], families: dict[str, str], hashes: dict[str, str], run_id: str,
               names: dict[str, str]) -> dict[str, str]:
    """The version tags for ``metrics`` (percent): ``eval.<set name>.<metric>`` = the score with 2 decimals
    (``85.12``), plus ``eval.<set name>.set_hash`` (which exact set: scores are comparable only under one hash)
    and ``eval.<set name>.run_id`` (the evaluation run, which holds every metric unrounded, the per-sequence DAVIS
    scores and the report) for each evaluation set used."""
    tags = {version_tag(names[families[m]], m): display(v) for m, v in metrics.items() if not _RUN_ONLY.fullmatch(m)}
    for fam in sorted(set(families.values())):
        tags[set_hash_tag(names[fam])] = hashes[fam]
        tags[f"eval.{names[fam]}.run_id"] = run_id
    return tags


def recorded_score(tags: dict[str, str], set_name: str, set_hash: str, metric: str) -> float | None:
    """The version's score for ``metric`` on the evaluation set ``set_hash`` (named ``set_name``), in percent, or
    None. Reads ``eval.<set name>.<metric>`` when ``eval.<set name>.set_hash`` is ``set_hash``; else a tag of the
    earlier layout, ``eval.<set hash>.<metric>`` (full precision, attention and DAVIS scores as fractions: they
    are converted to percent here)."""
    if tags.get(set_hash_tag(set_name)) == set_hash and version_tag(set_name, metric) in tags:
        return float(tags[version_tag(set_name, metric)])
    legacy = tags.get(version_tag(set_hash, metric)) if SET_HASH.fullmatch(set_hash or "") else None
    if legacy is None:
        return None
    value = float(legacy)
    return 100.0 * value if is_fraction_metric(metric) else value


def describe_champion(decision: dict[str, Any], version: int) -> str:
    """One sentence: what happened to the ``champion`` alias and why."""
    if decision.get("moved"):
        prev = decision.get("previous")
        return f"champion moved to v{version}" + (f" (from v{prev})" if prev is not None else "") + \
            f": {decision['reason']}"
    return f"champion unchanged: {decision['reason']}"


@task(name="publish-scores", cache_policy=NO_CACHE)
def publish_scores(model: dict[str, Any], metrics: dict[str, float], families: dict[str, str],
                   hashes: dict[str, str], run_id: str, names: dict[str, str] | None = None,
                   decision: dict[str, Any] | None = None, report_path: str | None = None) -> str:
    """A Prefect table artifact of the scores in reading order (k-NN 20 top-1 first, k numeric, then linear,
    attention, DAVIS), with the set names, values in percent (2 decimals) and, in its description, the champion
    decision and links to the MLflow run, model version and report. Returns its key."""
    from mlflow.tracking import MlflowClient

    names = names or {fam: h for fam, h in hashes.items()}
    key = f"dino-evaluate-{_slug(model['name'])}-v{model['version']}"
    rows = [{"evaluation set": names[families[m]], "score": label(m), "value (%)": display(metrics[m]),
             "metric": m} for m in ordered(metrics)]
    run = MlflowClient().get_run(run_id)
    run_link = mlflow_ui_link(f"experiments/{run.info.experiment_id}/runs/{run_id}")
    version_link = mlflow_ui_link(version_page(model["name"], model["version"]))
    lines = [f"**{model['name']} v{model['version']}**: scores in percent on "
             + ", ".join(f"`{n}` (set hash `{hashes[f]}`)" for f, n in names.items() if f in hashes) + "."]
    if decision is not None:
        lines.append(describe_champion(decision, model["version"]) + ".")
    links = [f"[MLflow run]({run_link})" if run_link else f"MLflow run `{run_id}`",
             f"[model card]({version_link})" if version_link else f"model `{model['uri']}`"]
    if report_path:
        report_link = mlflow_ui_link(f"experiments/{run.info.experiment_id}/runs/{run_id}/artifacts/{report_path}")
        links.append(f"[evaluation report]({report_link})" if report_link else f"report: run artifact `{report_path}`")
    lines.append(" · ".join(links))
    create_table_artifact(rows, key=key, description="\n\n".join(lines))
    return key


@task(name="update-champion", cache_policy=NO_CACHE)
def update_champion(name: str, version: int, metric: str, set_name: str | None, set_hash: str | None,
                    score: float | None, policy: str = "if_better", higher_is_better: bool = True) -> dict[str, Any]:
    """Move alias ``champion`` to ``version`` according to ``policy``:

    * ``always``: move it;
    * ``if_better``: move it when there is no champion yet, or when ``score`` beats the champion's score for
      ``metric`` on the same evaluation set (:func:`recorded_score`: same set hash), both rounded to the 2
      decimals the tags hold (a tie is not better); a champion without a score on this set keeps the alias (it
      must be re-evaluated on this set first — ``dino-reevaluate`` does that);
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
        prev = recorded_score(dict(current.tags or {}), set_name or "", set_hash, metric)
        where = f"{set_name} (set hash {set_hash})" if set_name else set_hash
        if prev is None:
            decision["reason"] = (f"champion v{previous} has no {metric} on evaluation set {where}: re-evaluate "
                                  "it before comparing")
        else:
            decision["previous_score"] = rounded(prev)
            new, old = rounded(score), rounded(prev)
            better = new > old if higher_is_better else new < old
            decision.update(moved=better, reason=f"{label(metric)} {display(new)} vs champion v{previous} "
                                                  f"{display(old)}: {'better' if better else 'not better'}")
    if decision["moved"]:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    run_logger().info("%s", describe_champion(decision, version))
    return decision


@task(name="describe-evaluation-run", cache_policy=NO_CACHE)
def describe_evaluation_run(run_id: str, model: dict[str, Any], metrics: dict[str, float],
                            families: dict[str, str], names: dict[str, str], hashes: dict[str, str],
                            decision: dict[str, Any] | None = None, report_path: str | None = None) -> str:
    """The evaluation run's description (shown on its page): what was evaluated on which sets, the headline
    scores, the champion decision, where the report is. Returns the markdown."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    version_link = mlflow_ui_link(version_page(model["name"], model["version"]))
    target = f"[{model['name']} v{model['version']}]({version_link})" if version_link else f"`{model['uri']}`"
    lines = [f"Evaluation of {target} on " + ", ".join(f"`{n}` (set hash `{hashes.get(f, '?')}`)"
                                                        for f, n in names.items()) + ".", ""]
    for fam, name in names.items():
        mine = ordered(m for m in metrics if families.get(m) == fam and not _RUN_ONLY.fullmatch(m))[:4]
        if mine:
            lines.append(f"- {name}: " + ", ".join(f"{label(m)} **{display(metrics[m])} %**" for m in mine))
    if decision is not None:
        lines += ["", describe_champion(decision, model["version"]) + "."]
    if report_path:
        link = mlflow_ui_link(f"experiments/{run.info.experiment_id}/runs/{run_id}/artifacts/{report_path}")
        where = f"[{report_path}]({link})" if link else f"artifact `{report_path}`"
        lines += ["", f"Report: {where} (retrieval, per-class accuracy, attention heads, DAVIS masks, feature map; "
                      "one HTML file that opens offline)."]
    text = "\n".join(lines)
    MlflowClient().set_tag(run_id, "mlflow.note.content", text)
    return text


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "model"


@task(name="publish-reevaluation-summary", cache_policy=NO_CACHE)
def publish_reevaluation_summary(registered_model: str, selected: list[int], evaluated: dict[int, dict[str, Any]],
                                 failed: dict[int, str], missing: dict[str, str] | None) -> str:
    """A Prefect markdown artifact of a ``dino-reevaluate`` run: which versions it selected and why, each one's
    headline scores (percent) or failure, and how the ``champion`` alias moved. Returns its key."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from prefect.artifacts import create_markdown_artifact

    key = f"dino-reevaluate-{_slug(registered_model)}"
    why = (f"versions without {label(missing['metric'])} on `{missing['set_name']}` (set hash "
           f"`{missing['set_hash']}`)" if missing else "every version")
    lines = [f"# dino-reevaluate: {registered_model}", "",
             f"Selected {why}: {', '.join(f'v{v}' for v in selected) or 'none'}.", ""]
    recorded = {m for r in evaluated.values() for m in r["metrics"] if not _RUN_ONLY.fullmatch(m)}
    columns = ordered(recorded)[:4]  # the headline scores: k-NN 20 top-1 first
    if selected:
        lines += ["| version | result | " + " | ".join(f"{label(m)} (%)" for m in columns) + " | champion |",
                  "|---|---|" + "---:|" * len(columns) + "---|"]
        for v in selected:
            if v in evaluated:
                r = evaluated[v]
                scores = [display(r["metrics"][m]) if m in r["metrics"] else "—" for m in columns]
                champion = describe_champion(r["champion"], v)
                sets = ", ".join(dict.fromkeys((r.get("evaluation_set_names") or {}).values()))
                lines.append(f"| v{v} | evaluated on {sets} | " + " | ".join(scores) + f" | {champion} |")
            else:
                msg = failed.get(v, "not run").replace("|", "/").replace("\n", " ")[:300]
                lines.append(f"| v{v} | **failed**: {msg} | " + " | ".join("—" for _ in columns) + " | — |")
        lines.append("")
    moves = [(v, r["champion"]) for v, r in sorted(evaluated.items()) if r["champion"].get("moved")]
    try:
        now = MlflowClient().get_model_version_by_alias(registered_model, CHAMPION_ALIAS).version
    except MlflowException:
        now = None
    if moves:
        first = moves[0][1].get("previous")
        path = " → ".join([f"v{first}" if first is not None else "(none)"] + [f"v{v}" for v, _ in moves])
        lines.append(f"**Alias moves**: champion {path} (now v{now}).")
    else:
        lines.append(f"**Alias moves**: none; champion is {'v' + str(now) if now else 'not set'}.")
    if failed:
        lines += ["", f"**{len(failed)} evaluation(s) failed**: {', '.join(f'v{v}' for v in sorted(failed))}."]
    create_markdown_artifact("\n".join(lines), key=key,
                             description=f"dino-reevaluate of {registered_model}: versions evaluated, scores, "
                                         "alias moves")
    return key


@task(name="end-evaluation-run", cache_policy=NO_CACHE)
def end_evaluation_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the evaluation run FINISHED or FAILED."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)

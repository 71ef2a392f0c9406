"""The ``dino-evaluate`` and ``dino-reevaluate`` flows: the paper's evaluations of registered backbones, with the
scores recorded in MLflow and the ``champion`` alias kept on the best version.

Run them

* in-process: ``dino evaluate models:/dino-backbone@candidate --train s3://b/imagenette/train
  --val s3://b/imagenette/val --features s3://b/features --davis ../shared/data/davis-mini``
  and ``dino reevaluate dino-backbone --train ... --val ... --missing knn20_top1``;
* as deployments: ``prefect deployment run dino-reevaluate/<deployment>`` (a cron schedule in ``prefect.yaml``
  keeps every version's scores current on the evaluation sets).

``dino-evaluate`` pins the model to one version, checks every input (shard sets, classes, DAVIS masks) before
running a model, extracts Parquet features (train and val, local or S3), runs the chosen evaluations, builds the
HTML evaluation report (retrieval, per-class accuracy, attention heads, DAVIS masks, a t-SNE map), and records the
scores, all in percent: version tags ``eval.<set name>.<metric>`` (2 decimals; ``eval.<set name>.set_hash`` says
which exact set), metrics of an MLflow evaluation run named by what it evaluates and linked to the version's
LoggedModel and to the data sets, the report and attention overlays as run artifacts, the version's model card
(its description), a Prefect table artifact with the champion decision; then applies the champion policy.
With ``precision="bf16"`` the k-NN is also run on fp32 features of a bounded subset and the difference recorded
(``knn<k>_top1_bf16_minus_fp32``, a warning beyond ``bf16_parity_tolerance``); ``nproc_per_node > 1`` extracts
the features with torchrun (one process per GPU), ``task_runner`` ``processes`` / ``dask`` / ``tcp://HOST:PORT``
as one task per sample range on that runner's workers (:func:`flows.extract.extract_split`). ``dino-reevaluate``
ends with a Prefect summary artifact:
versions evaluated, their scores, how ``champion`` moved.
With ``precision="bf16"`` each extraction first checks bf16 against fp32 on its first batch, falling back to fp32
when it fails (tag ``fast_path.extract`` of the evaluation run).
MLflow comes from ``MLFLOW_TRACKING_URI``. The flows only compose tasks from :mod:`tasks.evaluation`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from dino_model.eval.score_names import TOP5_MIN_CLASSES
from flows.extract import extract_split
from tasks.evaluation import (
    EvaluationSettings,
    ExtractionSpec,
    attention_scores,
    build_evaluation_report,
    check_evaluation_inputs,
    davis_scores,
    describe_evaluation_run,
    end_evaluation_run,
    evaluation_set_hashes,
    evaluation_set_names,
    find_versions_to_evaluate,
    is_version_tag_metric,
    knn_bf16_parity,
    knn_scores,
    linear_probe_fast,
    link_evaluation_run,
    linear_probe_full,
    log_evaluation_metrics,
    metric_family,
    open_evaluation_run,
    plan_feature_sets,
    publish_reevaluation_summary,
    publish_scores,
    record_fast_path,
    resolve_model_version,
    score_tags,
    tag_model_version,
    update_champion,
    version_tag,
    with_deployment_defaults,
)
from tasks.model_card import update_model_card
from tasks.validation.extraction_settings import ExtractionRunnerSettings, FeatureSettings


@flow(name="dino-evaluate", log_prints=True)
def dino_evaluate(model: str, settings: EvaluationSettings | dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate one registered model version and record its scores.

    Args:
        model: ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` (an alias is pinned to its version
            first, so moving it during the run changes nothing).
        settings: What to evaluate and how (:class:`tasks.evaluation.EvaluationSettings`): the train/val shard sets
            for k-NN and the linear probes, the DAVIS folder for attention maps and label propagation, the
            preprocessing, the features location, the MLflow experiment and the champion policy (metric,
            direction, ``always``/``if_better``/``never``). In a deployment run, a partial dict changes only its
            own fields of the deployment's settings (``--param settings='{"crop_size": 64}'``).

    Returns the version, the evaluation run id, the metrics (percent), the evaluation-set hashes and names, the
    feature locations, the champion decision and the report's artifact path.
    """
    settings = with_deployment_defaults(settings)  # a partial settings dict overrides only its own fields
    chosen = settings.selected()
    info = resolve_model_version(model)  # unknown model/version/alias fails here, before anything heavy
    facts = check_evaluation_inputs(settings)
    hashes = evaluation_set_hashes(facts)
    names = evaluation_set_names(facts)
    run_id = open_evaluation_run(settings.experiment, info, settings, hashes, str(flow_run.get_id() or "local"),
                                 facts.get("class_alignment"), names)
    metrics: dict[str, float] = {}
    features: dict[str, str] = {}
    try:
        if any(e in chosen for e in ("knn", "linear_fast")):
            expected = {"train": facts["train_samples"], "val": facts["val_samples"]}
            plan = plan_feature_sets(settings, info["name"], info["version"], hashes["classification"])
            extracted = _extract_feature_sets(plan, info, settings, facts, hashes["classification"])
            features = {fs["kind"]: fs["uri"] for fs in plan["sets"]}
            record_fast_path(run_id, "extract", {label: r["fast_path"] for label, r in extracted.items()})
            if "knn" in chosen:
                metrics |= knn_scores(features[plan["knn"]], settings.knn_ks, settings.knn_temperature,
                                      facts["num_classes"], settings.device, expected)
                # an extraction that fell back to fp32 stored fp32 features: no bf16 to compare
                if settings.runs_bf16_parity() and all(extracted[f"{plan['knn']}/{split}"]["precision"] == "bf16"
                                                       for split in ("train", "val")):
                    metrics |= knn_bf16_parity(info["uri"], features[plan["knn"]], facts["label_map"],
                                               facts["num_classes"], settings)
            if "linear_fast" in chosen:
                metrics |= linear_probe_fast(features[plan["linear_fast"]], settings.linear_fast_epochs,
                                             settings.linear_batch_size, settings.linear_base_lr,
                                             facts["num_classes"], settings.device, expected)
        if "linear" in chosen:
            metrics |= linear_probe_full(info["uri"], settings.train_data, settings.val_data, facts["label_map"],
                                         facts["num_classes"], settings)
        if "attention" in chosen:
            metrics |= attention_scores(info["uri"], settings, run_id)
        if "davis" in chosen:
            metrics |= davis_scores(info["uri"], settings)
        families = {m: metric_family(m, settings) for m in metrics}
        report = (build_evaluation_report(info, settings, facts, names, hashes, features, metrics, families, run_id)
                  if settings.report else None)
    except BaseException:
        end_evaluation_run(run_id, "FAILED")
        raise

    links = link_evaluation_run(run_id, info, facts, names, hashes, settings.davis_root)
    log_evaluation_metrics(run_id, metrics, links["model_ids"], families, links["datasets"])
    tag_model_version(info["name"], info["version"], score_tags(metrics, families, hashes, run_id, names))
    fam = metric_family(settings.champion_metric, settings)
    decision = update_champion(info["name"], info["version"], settings.champion_metric,
                               names.get(fam) if fam else None, hashes.get(fam) if fam else None,
                               metrics.get(settings.champion_metric), settings.champion_policy,
                               settings.higher_is_better)
    update_model_card(info["name"], info["version"])
    describe_evaluation_run(run_id, info, metrics, families, names, hashes, decision, report)
    publish_scores(info, metrics, families, hashes, run_id, names, decision, report)
    end_evaluation_run(run_id, "FINISHED")
    return {"model_uri": info["uri"], "name": info["name"], "version": info["version"], "run_id": run_id,
            "model_id": info["model_id"], "metrics": metrics, "evaluation_sets": hashes,
            "evaluation_set_names": names, "features": features, "champion": decision, "report": report}


def _extract_feature_sets(plan: dict[str, Any], info: dict[str, Any], settings: EvaluationSettings,
                          facts: dict[str, Any], set_hash: str) -> dict[str, dict[str, Any]]:
    """Both splits of every feature set of ``plan`` (:func:`tasks.evaluation.plan_feature_sets`), extracted with
    :func:`flows.extract.extract_split` on the settings' device and runner; the results by ``<kind>/<split>``."""
    runner = ExtractionRunnerSettings(device=settings.device, nproc_per_node=settings.nproc_per_node,
                                      task_runner=settings.task_runner, parallelism=settings.parallelism)
    meta = {"model_name": info["name"], "model_version": info["version"], "evaluation_set": set_hash,
            "classes_from": settings.train_data}
    extracted: dict[str, dict[str, Any]] = {}
    for fs in plan["sets"]:
        features = FeatureSettings(resize_size=settings.resize_size, crop_size=settings.crop_size,
                                   batch_size=settings.batch_size, n_last_blocks=fs["n_last_blocks"],
                                   avgpool=fs["avgpool"], precision=settings.precision,
                                   fast_path_check=settings.fast_path_check,
                                   feature_dtype=settings.feature_dtype)
        for split, data, label_map in (("train", settings.train_data, None),
                                       ("val", settings.val_data, facts["label_map"])):
            spec = ExtractionSpec(info["uri"], data, fs["uri"], split, features, settings.device, meta, label_map)
            extracted[f"{fs['kind']}/{split}"] = extract_split(spec, runner)
    return extracted


@flow(name="dino-reevaluate", log_prints=True)
def dino_reevaluate(
    registered_model: str = "dino-backbone",
    settings: EvaluationSettings | dict[str, Any] | None = None,
    missing_metric: str | None = "knn20_top1",
    versions: list[int] | None = None,
) -> dict[str, Any]:
    """Evaluate registered versions (ascending) with ``dino-evaluate`` as a subflow each.

    Args:
        registered_model: MLflow registered-model name.
        settings: The evaluation settings, as for ``dino-evaluate`` (the evaluation-set hash comes from them; a
            partial dict changes only its own fields of the deployment's settings).
        missing_metric: Only versions without this metric on the evaluation set of ``settings`` (tag
            ``eval.<set name>.<metric>`` under the set's hash, or the earlier ``eval.<set hash>.<metric>``);
            None = every version.
        versions: Restrict to these version numbers (default: all).

    A version whose evaluation fails does not stop the others; the flow fails at the end, listing them, after
    the summary artifact ``dino-reevaluate-<model>`` (versions, scores, alias moves) is written.
    Returns ``{"evaluated": {version: result}, "missing_tag": tag or None}``.
    """
    settings = with_deployment_defaults(settings)
    missing_tag = missing = None
    if missing_metric is not None:
        fam = metric_family(missing_metric, settings)
        if fam is None:
            raise ValueError(f"missing_metric {missing_metric!r} is not produced by the evaluations "
                             f"{settings.selected()}")
        if not is_version_tag_metric(missing_metric):
            raise ValueError(f"missing_metric {missing_metric!r} is recorded on the evaluation run only, not as a "
                             "version tag: choose an aggregate score such as knn20_top1 or davis_jf_mean")
        facts = check_evaluation_inputs(settings)
        if missing_metric.endswith("_top5") and facts.get("num_classes", TOP5_MIN_CLASSES) < TOP5_MIN_CLASSES:
            raise ValueError(f"missing_metric {missing_metric!r}: top-5 is not reported for the "
                             f"{facts['num_classes']} classes of {settings.train_data} (fewer than "
                             f"{TOP5_MIN_CLASSES}); choose a top-1 metric")
        missing = {"metric": missing_metric, "set_name": evaluation_set_names(facts)[fam],
                   "set_hash": evaluation_set_hashes(facts)[fam]}
        missing_tag = version_tag(missing["set_name"], missing_metric)
    todo = find_versions_to_evaluate(registered_model, missing, versions)
    evaluated: dict[int, Any] = {}
    failed: dict[int, str] = {}
    for v in todo:
        state = dino_evaluate(f"models:/{registered_model}/{v}", settings, return_state=True)
        if state.is_completed():
            evaluated[v] = state.result()
        else:
            failed[v] = str(state.message or state.name)
    publish_reevaluation_summary(registered_model, todo, evaluated, failed, missing)
    if failed:
        raise RuntimeError(f"evaluation failed for version(s) {sorted(failed)}: {failed}")
    return {"evaluated": evaluated, "missing_tag": missing_tag}

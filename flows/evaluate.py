"""The ``dino-evaluate`` and ``dino-reevaluate`` flows: the paper's evaluations of registered backbones, with the
scores recorded in MLflow and the ``champion`` alias kept on the best version.

Run them

* in-process: ``dino evaluate models:/dino-backbone@candidate --train s3://b/imagenette/train
  --val s3://b/imagenette/val --features s3://b/features --davis ../shared/data/davis-mini``
  and ``dino reevaluate dino-backbone --train ... --val ... --missing knn20_top1``;
* as deployments: ``prefect deployment run dino-reevaluate/<deployment>`` (a cron schedule in ``prefect.yaml``
  keeps every version's scores current on the evaluation sets).

``dino-evaluate`` pins the model to one version, checks every input (shard sets, classes, DAVIS masks) before
running a model, extracts Parquet features (train and val, local or S3), runs the chosen evaluations, and records
the scores: version tags ``eval.<set hash>.<metric>``, metrics of an MLflow evaluation run linked to the version's
LoggedModel, attention overlays as run artifacts, a Prefect table artifact; then applies the champion policy.
With ``precision="bf16"`` the k-NN is also run on fp32 features of a bounded subset and the difference recorded
(``knn<k>_top1_bf16_minus_fp32``, a warning beyond ``bf16_parity_tolerance``); ``nproc_per_node > 1`` extracts
the features with torchrun (one process per GPU).
MLflow comes from ``MLFLOW_TRACKING_URI``. The flows only compose tasks from :mod:`tasks.evaluation`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from dino_model.eval.features import feature_kind

from tasks.evaluation import (
    EvaluationSettings,
    attention_scores,
    check_evaluation_inputs,
    davis_scores,
    end_evaluation_run,
    evaluation_set_hashes,
    extract_split_features,
    features_location,
    find_versions_to_evaluate,
    knn_bf16_parity,
    knn_scores,
    linear_probe_fast,
    linear_probe_full,
    log_evaluation_metrics,
    metric_family,
    open_evaluation_run,
    publish_scores,
    resolve_model_version,
    score_tags,
    tag_model_version,
    update_champion,
    version_tag,
    with_deployment_defaults,
)


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

    Returns the version, the evaluation run id, the metrics, the evaluation-set hashes, the feature locations and
    the champion decision.
    """
    settings = with_deployment_defaults(settings)  # a partial settings dict overrides only its own fields
    chosen = settings.selected()
    info = resolve_model_version(model)  # unknown model/version/alias fails here, before anything heavy
    facts = check_evaluation_inputs(settings)
    hashes = evaluation_set_hashes(facts)
    run_id = open_evaluation_run(settings.experiment, info, settings, hashes, str(flow_run.get_id() or "local"),
                                 facts.get("class_alignment"))
    metrics: dict[str, float] = {}
    features: dict[str, str] = {}
    try:
        if any(e in chosen for e in ("knn", "linear_fast")):
            expected = {"train": facts["train_samples"], "val": facts["val_samples"]}
            common = dict(resize_size=settings.resize_size, crop_size=settings.crop_size,
                          batch_size=settings.batch_size, precision=settings.precision, device=settings.device,
                          nproc_per_node=settings.nproc_per_node)
            meta = {"model_name": info["name"], "model_version": info["version"],
                    "evaluation_set": hashes["classification"], "classes_from": settings.train_data}
            kinds = []
            if "knn" in chosen:
                kinds.append((1, False))
            if "linear_fast" in chosen and (settings.linear_n_last_blocks, settings.linear_avgpool) not in kinds:
                kinds.append((settings.linear_n_last_blocks, settings.linear_avgpool))
            for n_last, avgpool in kinds:
                kind = feature_kind(n_last, avgpool)
                uri = features_location(settings.features_root, info["name"], info["version"],
                                        hashes["classification"], kind)
                extract_split_features(info["uri"], settings.train_data, uri, "train", meta, n_last_blocks=n_last,
                                       avgpool=avgpool, **common)
                extract_split_features(info["uri"], settings.val_data, uri, "val", meta, n_last_blocks=n_last,
                                       avgpool=avgpool, label_map=facts["label_map"], **common)
                features[kind] = uri
            if "knn" in chosen:
                metrics |= knn_scores(features["cls"], settings.knn_ks, settings.knn_temperature,
                                      facts["num_classes"], settings.device, expected)
                if settings.runs_bf16_parity():
                    metrics |= knn_bf16_parity(info["uri"], features["cls"], facts["label_map"],
                                               facts["num_classes"], settings)
            if "linear_fast" in chosen:
                probe_kind = feature_kind(settings.linear_n_last_blocks, settings.linear_avgpool)
                metrics |= linear_probe_fast(features[probe_kind], settings.linear_fast_epochs,
                                             settings.linear_batch_size, settings.linear_base_lr,
                                             facts["num_classes"], settings.device, expected)
        if "linear" in chosen:
            metrics |= linear_probe_full(info["uri"], settings.train_data, settings.val_data, facts["label_map"],
                                         facts["num_classes"], settings)
        if "attention" in chosen:
            metrics |= attention_scores(info["uri"], settings, run_id)
        if "davis" in chosen:
            metrics |= davis_scores(info["uri"], settings)
    except BaseException:
        end_evaluation_run(run_id, "FAILED")
        raise

    families = {m: metric_family(m, settings) for m in metrics}
    sets = {"classification": facts.get("classification_set", ""), "video": facts.get("video_set", "")}
    log_evaluation_metrics(run_id, metrics, info["model_id"])
    tag_model_version(info["name"], info["version"], score_tags(metrics, families, hashes, run_id, sets))
    publish_scores(info, metrics, families, hashes, run_id)
    fam = metric_family(settings.champion_metric, settings)
    decision = update_champion(info["name"], info["version"], settings.champion_metric,
                               hashes.get(fam) if fam else None, metrics.get(settings.champion_metric),
                               settings.champion_policy, settings.higher_is_better)
    end_evaluation_run(run_id, "FINISHED")
    return {"model_uri": info["uri"], "name": info["name"], "version": info["version"], "run_id": run_id,
            "model_id": info["model_id"],
            "metrics": metrics, "evaluation_sets": hashes, "features": features, "champion": decision}


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
            ``eval.<set hash>.<metric>``); None = every version.
        versions: Restrict to these version numbers (default: all).

    A version whose evaluation fails does not stop the others; the flow fails at the end, listing them.
    Returns ``{"evaluated": {version: result}, "missing_tag": tag or None}``.
    """
    settings = with_deployment_defaults(settings)
    missing_tag = None
    if missing_metric is not None:
        fam = metric_family(missing_metric, settings)
        if fam is None:
            raise ValueError(f"missing_metric {missing_metric!r} is not produced by the evaluations "
                             f"{settings.selected()}")
        facts = check_evaluation_inputs(settings)
        missing_tag = version_tag(evaluation_set_hashes(facts)[fam], missing_metric)
    todo = find_versions_to_evaluate(registered_model, missing_tag, versions)
    evaluated: dict[int, Any] = {}
    failed: dict[int, str] = {}
    for v in todo:
        state = dino_evaluate(f"models:/{registered_model}/{v}", settings, return_state=True)
        if state.is_completed():
            evaluated[v] = state.result()
        else:
            failed[v] = str(state.message or state.name)
    if failed:
        raise RuntimeError(f"evaluation failed for version(s) {sorted(failed)}: {failed}")
    return {"evaluated": evaluated, "missing_tag": missing_tag}

"""Prefect tasks of the ``dino-extract``, ``dino-evaluate`` and ``dino-reevaluate`` flows, one module per stage:

==================  ==================================================================================
``settings.py``     :class:`EvaluationSettings`, which metrics the selected evaluations produce, device
``registry.py``     pin ``models:/name@alias`` to a version; the versions ``dino-reevaluate`` evaluates
``preflight.py``    every bad input reported before a model runs; the evaluation-set hashes
``features.py``     backbone features of a shard set → Parquet (in-process, ``torchrun``, or one task per
                    sample range on a task runner)
``scores.py``       k-NN (+ bf16 parity), fast and full linear probes, attention maps, DAVIS J&F
``recording.py``    MLflow evaluation run (inputs, linked metrics), version tags, Prefect artifacts, ``champion``
``report.py``       the HTML evaluation report (:mod:`dino_model.eval.report`) logged to the evaluation run
``common.py``       the two input errors and the run logger
==================  ==================================================================================

Each task does one thing with at most one side effect; clients (MLflow, boto3 through :mod:`dino_model.storage`)
are created inside the task; no task caches (every one reads state that changes). The computations themselves
live in :mod:`dino_model.eval`. Import the tasks from this package (``from tasks.evaluation import knn_scores``).

Where scores go (``N`` = the evaluation set's name, ``H`` its hash, see :func:`evaluation_set_names` and
:func:`evaluation_set_hashes`; every score in percent):

* the MLflow **model version**: tags ``eval.<N>.<metric>`` (e.g. ``eval.imagenette-128-val.knn20_top1`` =
  ``85.12``, 2 decimals), plus ``eval.<N>.set_hash`` (= ``H``: scores are comparable only under one hash) and
  ``eval.<N>.run_id`` (the evaluation run); its description, the **model card**
  (:mod:`tasks.model_card`), is rewritten with the scores. Versions scored before sets had names carry
  ``eval.<H>.<metric>`` (full precision, attention / DAVIS as fractions): :func:`recorded_score` reads both, so
  ``dino-reevaluate`` does not re-evaluate them and the champion policy compares with them;
* an MLflow **evaluation run** (experiment ``dino-evaluate`` by default), named by what it evaluates
  (``dino-backbone-v3 knn+linear_fast on imagenette-128-val``): the metrics unrounded, each linked to the
  version's LoggedModel and to a stand-in LoggedModel of the run (the UI's Model column) and to its data set
  (``log_inputs``: the Dataset column); the **evaluation report** ``report/evaluation-report.html``
  (:func:`build_evaluation_report`); attention overlays under ``attention/``;
* Prefect artifacts: a **table** ``dino-evaluate-<model>-v<version>`` (scores in reading order, champion
  decision, links) and, for ``dino-reevaluate``, a **summary** ``dino-reevaluate-<model>``;
* the alias ``champion`` moves to the version when the champion policy says so (:func:`update_champion`).

Metric names: ``knn<k>_top1`` / ``knn<k>_top5``; ``linear_approx_best_top1`` / ``linear_approx_final_top1`` /
``linear_approx_final_top5`` (the fast probe on cached centre-crop features — an APPROXIMATION of the paper's
protocol); ``linear_best_top1`` / ``linear_final_top1`` / ``linear_final_top5`` (the full protocol);
``attn_jaccard_best_head`` / ``attn_jaccard_mean_heads`` / ``attn_jaccard_union_heads``; ``davis_jf_mean``,
``davis_j_mean``, ``davis_f_mean``, ``davis_j_recall``, ``davis_f_recall``, ``davis_j_decay``, ``davis_f_decay``
and ``davis_seq_<sequence>_jf`` (on the run only). All in percent (:mod:`dino_model.eval.score_names`); top-5
only for sets of at least 10 classes. With ``precision="bf16"`` the k-NN also gets its parity check against the
fp32 reference (:func:`knn_bf16_parity`): ``knn<k>_top1_bf16_minus_fp32`` (percentage points, on a bounded
subset). Each bf16
extraction first checks bf16 against fp32 on its first batch (``fast_path_check``): the evaluation run's tag
``fast_path.extract`` records the verdict (:func:`record_fast_path`); an extraction that fell back to fp32 has no
parity to measure, so the parity check is skipped then.

Feature extraction runs in the task's process by default; ``nproc_per_node > 1`` launches
``torchrun -m dino_model.eval.extract`` (one process per GPU, each over its own contiguous range of the samples,
see :mod:`dino_model.eval.extract`) and follows its output like the trainer's; ``task_runner`` ``processes``,
``dask`` or ``tcp://HOST:PORT`` runs one :func:`extract_feature_range` task per sample range on that runner's
workers instead (``flows.extract.extract_split``).
"""

from .common import EvaluationInputError, ModelVersionNotFound
from .features import (
    ExtractionSpec,
    check_feature_precision,
    extract_feature_range,
    extract_split_features,
    features_location,
    collect_feature_ranges,
    finish_feature_ranges,
    plan_feature_ranges,
    plan_feature_sets,
)
from .preflight import (
    check_evaluation_inputs,
    check_extraction_input,
    default_set_name,
    evaluation_set_hashes,
    evaluation_set_names,
)
from .recording import (
    CHAMPION_ALIAS,
    describe_evaluation_run,
    end_evaluation_run,
    is_version_tag_metric,
    link_evaluation_run,
    log_evaluation_metrics,
    open_evaluation_run,
    publish_reevaluation_summary,
    publish_scores,
    recorded_score,
    record_fast_path,
    score_tags,
    tag_model_version,
    update_champion,
)
from .report import REPORT_PATH, build_evaluation_report
from .registry import find_versions_to_evaluate, parse_model_uri, resolve_model_version
from .scores import (
    attention_scores,
    bf16_parity_metrics,
    davis_scores,
    knn_bf16_parity,
    knn_scores,
    linear_probe_fast,
    linear_probe_full,
)
from .settings import EvaluationSettings, metric_family, set_hash_tag, version_tag, with_deployment_defaults

__all__ = [
    "CHAMPION_ALIAS",
    "EvaluationInputError",
    "EvaluationSettings",
    "ExtractionSpec",
    "ModelVersionNotFound",
    "REPORT_PATH",
    "attention_scores",
    "bf16_parity_metrics",
    "build_evaluation_report",
    "check_evaluation_inputs",
    "check_extraction_input",
    "check_feature_precision",
    "davis_scores",
    "describe_evaluation_run",
    "default_set_name",
    "end_evaluation_run",
    "evaluation_set_hashes",
    "evaluation_set_names",
    "extract_feature_range",
    "extract_split_features",
    "features_location",
    "collect_feature_ranges",
    "finish_feature_ranges",
    "find_versions_to_evaluate",
    "is_version_tag_metric",
    "record_fast_path",
    "knn_bf16_parity",
    "knn_scores",
    "linear_probe_fast",
    "linear_probe_full",
    "link_evaluation_run",
    "log_evaluation_metrics",
    "metric_family",
    "open_evaluation_run",
    "parse_model_uri",
    "publish_reevaluation_summary",
    "plan_feature_ranges",
    "plan_feature_sets",
    "publish_scores",
    "recorded_score",
    "resolve_model_version",
    "score_tags",
    "set_hash_tag",
    "tag_model_version",
    "update_champion",
    "version_tag",
    "with_deployment_defaults",
]

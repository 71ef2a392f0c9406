"""Prefect tasks of the ``dino-extract``, ``dino-evaluate`` and ``dino-reevaluate`` flows, one module per stage:

==================  ==================================================================================
``settings.py``     :class:`EvaluationSettings`, which metrics the selected evaluations produce, device
``registry.py``     pin ``models:/name@alias`` to a version; the versions ``dino-reevaluate`` evaluates
``preflight.py``    every bad input reported before a model runs; the evaluation-set hashes
``features.py``     backbone features of a shard set → Parquet (in-process or ``torchrun``)
``scores.py``       k-NN (+ bf16 parity), fast and full linear probes, attention maps, DAVIS J&F
``recording.py``    MLflow evaluation run, version tags, Prefect table artifact, ``champion`` alias
``common.py``       the two input errors and the run logger
==================  ==================================================================================

Each task does one thing with at most one side effect; clients (MLflow, boto3 through :mod:`dino_model.storage`)
are created inside the task; no task caches (every one reads state that changes). The computations themselves
live in :mod:`dino_model.eval`. Import the tasks from this package (``from tasks.evaluation import knn_scores``).

Where scores go (``H`` = the evaluation-set hash of the score's family, see :func:`evaluation_set_hashes`):

* the MLflow **model version**: tags ``eval.<H>.<metric>`` (e.g. ``eval.3f2a9c01b7de.knn20_top1``), plus
  ``eval.<H>.run_id`` (the evaluation run) and ``eval.<H>.set`` (what the set is);
* an MLflow **evaluation run** (experiment ``dino-evaluate`` by default): the same metrics, linked to the version's
  LoggedModel (``mlflow.log_metrics(..., model_id=...)``) so they also show on the logged model; attention
  overlays as PNG artifacts under ``attention/``;
* a Prefect **table artifact** ``dino-evaluate-<model>-v<version>``;
* the alias ``champion`` moves to the version when the champion policy says so (:func:`update_champion`).

Metric names: ``knn<k>_top1`` / ``knn<k>_top5``; ``linear_approx_best_top1`` / ``linear_approx_final_top1`` /
``linear_approx_final_top5`` (the fast probe on cached centre-crop features — an APPROXIMATION of the paper's
protocol); ``linear_best_top1`` / ``linear_final_top1`` / ``linear_final_top5`` (the full protocol);
``attn_jaccard_best_head`` / ``attn_jaccard_mean_heads`` / ``attn_jaccard_union_heads``; ``davis_jf_mean``,
``davis_j_mean``, ``davis_f_mean``, ``davis_j_recall``, ``davis_f_recall``, ``davis_j_decay``, ``davis_f_decay``
and ``davis_seq_<sequence>_jf``. Accuracies in percent, DAVIS and Jaccard scores in [0, 1].
With ``precision="bf16"`` the k-NN also gets its parity check against the fp32 reference
(:func:`knn_bf16_parity`): ``knn<k>_top1_bf16_minus_fp32`` (percentage points, on a bounded subset).

Feature extraction runs in the task's process by default; ``nproc_per_node > 1`` launches
``torchrun -m dino_model.eval.extract`` (one process per GPU, each over its own contiguous range of the samples,
see :mod:`dino_model.eval.extract`) and follows its output like the trainer's.
"""

from .common import EvaluationInputError, ModelVersionNotFound
from .features import extract_split_features, features_location
from .preflight import check_evaluation_inputs, check_extraction_input, evaluation_set_hashes
from .recording import (
    CHAMPION_ALIAS,
    end_evaluation_run,
    log_evaluation_metrics,
    open_evaluation_run,
    publish_scores,
    score_tags,
    tag_model_version,
    update_champion,
)
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
from .settings import EvaluationSettings, metric_family, version_tag, with_deployment_defaults

__all__ = [
    "CHAMPION_ALIAS",
    "EvaluationInputError",
    "EvaluationSettings",
    "ModelVersionNotFound",
    "attention_scores",
    "bf16_parity_metrics",
    "check_evaluation_inputs",
    "check_extraction_input",
    "davis_scores",
    "end_evaluation_run",
    "evaluation_set_hashes",
    "extract_split_features",
    "features_location",
    "find_versions_to_evaluate",
    "knn_bf16_parity",
    "knn_scores",
    "linear_probe_fast",
    "linear_probe_full",
    "log_evaluation_metrics",
    "metric_family",
    "open_evaluation_run",
    "parse_model_uri",
    "publish_scores",
    "resolve_model_version",
    "score_tags",
    "tag_model_version",
    "update_champion",
    "version_tag",
    "with_deployment_defaults",
]

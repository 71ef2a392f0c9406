"""The ``dino-extract`` flow: a backbone's features of one shard set, written as a Parquet dataset.

    dino extract models:/dino-backbone@champion s3://bucket/imagenette/val s3://bucket/features/v3 --split val \\
        --classes-from s3://bucket/imagenette/train --resize 146 --crop 128
    dino extract ... --nproc-per-node 8          # 8 GPUs: torchrun -m dino_model.eval.extract
    dino extract ... --task-runner tcp://10.0.0.5:8786   # one task per sample range on a Dask cluster

Output: ``<output>/<split>/part-*.parquet`` with columns ``key``, ``label``, ``split``, ``features``
(fixed-size list of float32) and metadata (model URI and version, preprocessing, feature kind, precision,
dimension) — see :mod:`dino_model.eval.features`. ``dino-evaluate`` extracts its own features; this flow is for
feature sets used elsewhere (notebooks, other classifiers). The flow only composes tasks from
:mod:`tasks.evaluation`; :func:`extract_split`, which ``dino-evaluate`` shares, composes one split's extraction.
"""

from __future__ import annotations

from typing import Any

from tasks.evaluation import (
    ExtractionSpec,
    check_extraction_input,
    check_feature_precision,
    collect_feature_ranges,
    extract_feature_range,
    extract_split_features,
    finish_feature_ranges,
    plan_feature_ranges,
    resolve_model_version,
)
from tasks.flow_parameters import grouped_flow, resolve_flow_groups
from tasks.task_runners import open_task_runner, worker_slots
from tasks.validation.extraction_settings import (
    EXTRACT_GROUPS,
    EXTRACT_RENAMES,
    ExtractionRunnerSettings,
    FeatureSettings,
)
from tasks.validation.task_runners import check_extraction_runner


@grouped_flow(EXTRACT_RENAMES, name="dino-extract", log_prints=True)
def dino_extract(
    model: str,
    data: str,
    output: str,
    split: str = "train",
    classes_from: str | None = None,
    features: FeatureSettings | dict[str, Any] | None = None,
    runner: ExtractionRunnerSettings | dict[str, Any] | None = None,
    **deprecated: Any,
) -> dict[str, Any]:
    """Extract features of every sample of ``data`` (in order, none dropped) to ``<output>/<split>/``.

    Args:
        model: ``models:/<name>/<version>``, ``models:/<name>@<alias>`` (pinned to its version), a checkpoint
            (file or folder, local or s3://) or an export folder.
        data: Shard set (local path or s3://) written by ``dino-shard``.
        output: Dataset root (local folder or s3:// prefix); the split's files go to ``<output>/<split>/``.
        split: Split name stored in every row and naming the folder (re-extracting a split replaces it).
        classes_from: The training shard set whose class indices the labels should use (for a val set written
            separately); None keeps this set's own indices.
        features: Which features and how they are computed
            (:class:`tasks.validation.extraction_settings.FeatureSettings`): preprocessing (``resize_size``,
            ``crop_size``), ``batch_size``, ``n_last_blocks``, ``avgpool``, ``precision`` and its
            ``fast_path_check``. The result's ``precision`` is what ran and ``fast_path`` the verdict (also in the
            files' metadata). A partial dict changes only its own fields of the deployment's.
        runner: Where the extraction runs (:class:`tasks.validation.extraction_settings.ExtractionRunnerSettings`):
            ``device``; ``nproc_per_node`` torchrun processes (one GPU each), or one task per contiguous sample
            range on ``task_runner`` (``processes``, ``dask``, ``tcp://HOST:PORT``) with ``parallelism`` workers,
            each writing ``part-r<range>-*.parquet``. A partial dict changes only its own fields.
        deprecated: The flat names these groups replaced (``resize_size=``, ``task_runner=`` ...): still accepted,
            with a warning naming the new spelling.
    """
    groups = resolve_flow_groups(EXTRACT_GROUPS, {"features": features, "runner": runner}, deprecated,
                                 EXTRACT_RENAMES)
    features, runner = groups["features"], groups["runner"]
    check_extraction_runner(runner.task_runner, runner.parallelism, runner.nproc_per_node)
    # the checks `dino extract` runs first
    facts = check_extraction_input(data, classes_from, features.resize_size, features.crop_size)
    metadata: dict[str, Any] = {"classes_from": classes_from or data}
    model_uri = model
    if model.startswith("models:/"):
        info = resolve_model_version(model)
        model_uri = info["uri"]
        metadata.update(model_name=info["name"], model_version=info["version"])
    spec = ExtractionSpec(model_uri, data, output, split, features, runner.device, metadata, facts["label_map"])
    return extract_split(spec, runner)


def extract_split(spec: ExtractionSpec, runner: ExtractionRunnerSettings) -> dict[str, Any]:
    """One split's features, inside the calling flow run: the ``extract-features`` task (in-process, or torchrun
    with ``runner.nproc_per_node`` processes) for ``threads``, else one ``extract-feature-range`` task per sample
    range on the chosen runner, then ``finish-feature-ranges``; with bf16, ``check-feature-precision`` first
    decides the precision of every range (one verdict for the whole extraction).
    Returns the written dataset's summary (``uri``, ``num_rows``, ``dim``, ``files``, ``feature_kind``)."""
    if runner.task_runner == "threads":
        return extract_split_features(spec, runner.nproc_per_node)
    with open_task_runner(runner.task_runner, runner.parallelism) as pool:
        plan = plan_feature_ranges(spec.data, worker_slots(pool, runner.parallelism), runner.task_runner,
                                   runner.parallelism)
        reuse = {"reuse_key": plan["reuse_key"], "torch_threads": plan["torch_threads"]}
        fast_path = pool.submit(check_feature_precision, {"spec": spec, **reuse}).result()
        futures = [pool.submit(extract_feature_range, {"spec": spec, "index": index, "count": plan["count"],
                                                       "fast_path": fast_path, **reuse})
                   for index in range(plan["count"])]
        summaries = collect_feature_ranges(futures, spec, runner.task_runner)
    return finish_feature_ranges(spec, summaries)

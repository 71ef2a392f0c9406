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

from typing import Any, Literal

from prefect import flow

from tasks.evaluation import (
    check_extraction_input,
    check_feature_precision,
    collect_feature_ranges,
    extract_feature_range,
    extract_split_features,
    finish_feature_ranges,
    plan_feature_ranges,
    resolve_model_version,
)
from tasks.task_runners import open_task_runner, worker_slots
from tasks.validation.task_runners import check_extraction_runner


@flow(name="dino-extract", log_prints=True)
def dino_extract(
    model: str,
    data: str,
    output: str,
    split: str = "train",
    classes_from: str | None = None,
    resize_size: int | None = 256,
    crop_size: int | None = 224,
    batch_size: int = 64,
    n_last_blocks: int = 1,
    avgpool: bool = False,
    precision: Literal["fp32", "bf16"] = "fp32",
    device: str = "auto",
    nproc_per_node: int = 1,
    fast_path_check: Literal["fallback", "strict", "off"] = "fallback",
    task_runner: str = "threads",
    parallelism: int = 2,
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
        resize_size: Short side before the centre crop (reference 256, bicubic); None keeps the size.
        crop_size: Centre-crop side (reference 224); None keeps the resized image (equal sizes needed).
        batch_size: Images per forward pass.
        n_last_blocks: Features = [CLS] of the last n blocks concatenated (1 = the k-NN features).
        avgpool: Append the average of the last block's patch tokens.
        precision: ``fp32`` (reference) or ``bf16`` autocast.
        device: ``auto`` (cuda when present), ``cpu``, ``cuda``, ``cuda:1``...
        nproc_per_node: Extraction processes: 1 = in the flow's process; G > 1 = ``torchrun --nproc_per_node=G
            -m dino_model.eval.extract`` (one GPU each, ``device`` ``auto``/``cuda``/``cpu``), each over a
            contiguous range of the samples, writing ``part-r<rank>-*.parquet``.
        fast_path_check: With bf16: compare bf16 with fp32 features on the first batch; ``fallback`` extracts in
            fp32 when that fails, ``strict`` fails, ``off`` skips the check. The result's ``precision`` is what
            ran and ``fast_path`` the verdict (also in the files' metadata).
        task_runner: ``threads`` (the extraction runs in the flow's process, or under torchrun), or where one task
            per contiguous sample range runs, each writing ``part-r<range>-*.parquet``: ``processes`` (of this
            machine), ``dask`` (a local Dask cluster) or ``tcp://HOST:PORT`` (a running Dask scheduler; its
            workers need this project, the model's and the data's credentials). Each worker process loads the
            backbone once.
        parallelism: worker processes of ``processes`` / ``dask`` (a ``tcp://`` cluster has its own).
    """
    check_extraction_runner(task_runner, parallelism, nproc_per_node)
    facts = check_extraction_input(data, classes_from, resize_size, crop_size)  # the checks `dino extract` runs first
    metadata: dict[str, Any] = {"classes_from": classes_from or data}
    model_uri = model
    if model.startswith("models:/"):
        info = resolve_model_version(model)
        model_uri = info["uri"]
        metadata.update(model_name=info["name"], model_version=info["version"])
    return extract_split(model_uri, data, output, split, metadata, task_runner=task_runner, parallelism=parallelism,
                         resize_size=resize_size, crop_size=crop_size, batch_size=batch_size,
                         n_last_blocks=n_last_blocks, avgpool=avgpool, precision=precision, device=device,
                         label_map=facts["label_map"], nproc_per_node=nproc_per_node, fast_path_check=fast_path_check)


def extract_split(model_uri: str, data: str, output: str, split: str, metadata: dict[str, Any], *,
                  task_runner: str = "threads", parallelism: int = 2, nproc_per_node: int = 1,
                  label_map: list[int] | None = None, **options: Any) -> dict[str, Any]:
    """One split's features, inside the calling flow run: the ``extract-features`` task (in-process or torchrun)
    for ``threads``, else one ``extract-feature-range`` task per sample range on the chosen runner, then
    ``finish-feature-ranges``; with bf16, ``check-feature-precision`` first decides the precision of every range
    (one verdict for the whole extraction). ``options``: the preprocessing, model and ``fast_path_check`` options of
    :func:`dino_extract`.
    Returns the written dataset's summary (``uri``, ``num_rows``, ``dim``, ``files``, ``feature_kind``)."""
    if task_runner == "threads":
        return extract_split_features(model_uri, data, output, split, metadata, label_map=label_map,
                                      nproc_per_node=nproc_per_node, **options)
    with open_task_runner(task_runner, parallelism) as runner:
        plan = plan_feature_ranges(data, worker_slots(runner, parallelism), task_runner, parallelism)
        fast_path = runner.submit(check_feature_precision, {
            "model_uri": model_uri, "data": data, "reuse_key": plan["reuse_key"],
            "torch_threads": plan["torch_threads"], **options,
        }).result()
        futures = [
            runner.submit(extract_feature_range, {
                "model_uri": model_uri, "data": data, "out_uri": output, "split": split, "metadata": metadata,
                "index": index, "count": plan["count"], "reuse_key": plan["reuse_key"], "label_map": label_map,
                "torch_threads": plan["torch_threads"], "fast_path": fast_path, **options,
            })
            for index in range(plan["count"])
        ]
        summaries = collect_feature_ranges(futures, split, data, task_runner, options.get("n_last_blocks", 1),
                                           options.get("avgpool", False))
    return finish_feature_ranges(output, split, data, summaries, options.get("n_last_blocks", 1),
                                 options.get("avgpool", False))

"""The ``dino-shard`` flow: a dataset on disk -> WebDataset shards + ``manifest.json`` on local disk or S3.

    dino shard ../shared/data/imagenette-128/train s3://bucket/imagenette/train          # the CLI (in-process)
    python -c "from flows.shard import dino_shard; dino_shard('/data/train', '/data/shards/train')"

    dino shard /data/train s3://bucket/train --task-runner dask --parallelism 8    # a local Dask cluster
    dino shard /data/train s3://bucket/train --task-runner tcp://10.0.0.5:8786     # a running Dask scheduler

Steps: validate the input as a whole (destination URI, source root, label files, options, destination writable,
at least one image) before anything is written; scan; plan shuffled shard ranges; write them in parallel — one
Prefect task per shard range on the chosen task runner (``threads``, ``processes``, ``dask`` or a Dask scheduler's
``tcp://`` address; see :mod:`tasks.task_runners`), which runs ``parallelism`` of them at a time; each is retried
on transient storage errors, rerun elsewhere if its worker dies, and skipped when an identical shard is already
there; write the manifest; publish a markdown summary. A progress artifact follows the shards as they finish.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.utilities.annotations import quote

from dino_model.data.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY
from dino_model.data.shard_writer import ShardOptions, ShardSummary, default_name, validate_request
from dino_model.data.sources import SourceSpec
from tasks.shard import (
    assemble_manifest,
    check_destination,
    collect_shard_outcomes,
    emit_progress,
    make_summary,
    plan_shards_task,
    publish_summary,
    report_progress,
    scan_source_task,
    start_progress,
    write_manifest_task,
    write_shard_task,
)
from tasks.task_runners import open_task_runner
from tasks.validation.task_runners import check_parallelism, check_task_runner

SourceKind = Literal["auto", "imagefolder", "ilsvrc-train", "ilsvrc-val", "flat"]


@flow(name="dino-shard", validate_parameters=True)
def dino_shard(
    source: str,
    destination: str,
    name: str | None = None,
    kind: SourceKind = "auto",
    labels: str | None = None,
    meta: str | None = None,
    classes: str | None = None,
    classes_from: str | None = None,
    shard_size: int | None = 1000,
    shard_bytes: int | None = None,
    seed: int = 0,
    quality: int = DEFAULT_QUALITY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    parallelism: int = 4,
    task_runner: str = "threads",
) -> ShardSummary:
    """Shard an image dataset for DINO pretraining.

    Args:
        source: the input: an ImageFolder root (``root/<class>/*``), the ILSVRC-2012 train tar, the ILSVRC val
            images (folder or tar, with ``labels``), or a flat folder of unlabelled images.
        destination: where shards and ``manifest.json`` go: a local path, ``file:///abs/path`` or
            ``s3://bucket/prefix`` (endpoint and credentials from the standard AWS environment variables).
        name: shard name prefix (``<name>-000000.tar``); default: the source folder's name.
        kind: the input layout; ``auto`` detects it (see :mod:`dino_model.data.sources`).
        labels: ILSVRC val label file: ``LOC_val_solution.csv`` or the devkit's ground-truth ``.txt``.
        meta: the devkit's ``meta.mat`` (needed with the devkit ground truth).
        classes: optional text file listing class ids in index order (e.g. to align val with a train subset).
        classes_from: optional shard set (path or URI, usually the train set's) whose manifest's classes give the
            class indices; one of ``classes`` / ``classes_from`` at most. Without either, an ILSVRC val set whose
            labels cover fewer than 1000 classes is indexed by its own classes, with a warning.
        shard_size: at most this many samples per shard (None: only ``shard_bytes`` limits).
        shard_bytes: close a shard once its input bytes reach this (None: only ``shard_size`` limits).
        seed: seed of the global shuffle that mixes classes across shards.
        quality: JPEG quality for images that must be re-encoded (CMYK JPEG, PNG, WebP, ...).
        max_pixels: images with more pixels are rejected as decompression bombs.
        parallelism: how many shard tasks run at once: the threads, processes or local Dask workers of the task
            runner (a ``tcp://`` scheduler's own workers decide there).
        task_runner: where the shard tasks run: ``threads`` (of the flow's process), ``processes`` (of its
            machine), ``dask`` (a local Dask cluster of ``parallelism`` worker processes) or ``tcp://HOST:PORT``
            (a running Dask scheduler; its workers need this project installed and the destination's
            credentials in their environment).

    Returns:
        A :class:`~dino_model.data.shard_writer.ShardSummary` (counts, shards written vs already present).
    """
    # -- 1. the input as a whole: every check here runs before anything is written ---------------------------
    check_parallelism(parallelism)
    check_task_runner(task_runner)
    options = ShardOptions(
        name=name or default_name(source), shard_size=shard_size, shard_bytes=shard_bytes, seed=seed,
        quality=quality, max_pixels=max_pixels,
    )
    spec = SourceSpec(source, kind, labels, meta, classes, classes_from)
    validate_request(spec, destination, options)  # bad URI, missing root or label file
    scan = scan_source_task(spec)  # fails when there is no image at all
    # Last check: the probe write creates the destination folder, so it runs only once everything else passed.
    destination = check_destination(destination)

    # -- 2. plan, then write shard ranges in parallel --------------------------------------------------------
    # quote(): the scan and plans can hold millions of items; Prefect need not walk them looking for futures.
    plans, previous, old_manifest = plan_shards_task(destination, quote(scan), options)
    emit_progress("total", sum(len(p.items) for p in plans))
    progress_id = start_progress(options.name, len(plans))
    with open_task_runner(task_runner, parallelism) as runner:
        # Plain values, no quote(): a Dask scheduler would unpack the annotation (a tuple) into the arguments.
        futures = [
            runner.submit(write_shard_task, {
                "destination": destination, "plan": plan, "options": options, "classes": scan.classes,
                "class_names": scan.class_names, "previous": previous.get(plan.index),
            })
            for plan in plans
        ]
        ordered = collect_shard_outcomes(futures, plans, progress_id, options.name, task_runner)

    # -- 3. manifest and summary -----------------------------------------------------------------------------
    manifest = assemble_manifest(scan, plans, ordered, options)
    wrote = write_manifest_task(destination, quote(manifest), quote(old_manifest))
    summary = make_summary(destination, manifest, ordered, wrote)
    publish_summary(quote(manifest), summary)
    return summary

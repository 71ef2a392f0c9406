"""The ``dino-shard`` flow: a dataset on disk -> WebDataset shards + ``manifest.json`` on local disk or S3.

    dino shard ../shared/data/imagenette-128/train s3://bucket/imagenette/train          # the CLI (in-process)
    python -c "from flows.shard import dino_shard; dino_shard('/data/train', '/data/shards/train')"

Steps: validate the input as a whole (destination URI, source root, label files, options, destination writable,
at least one image) before anything is written; scan; plan shuffled shard ranges; write them in parallel — one
Prefect task per shard range, at most ``parallelism`` at a time, each retried on transient storage errors and
skipped when an identical shard is already there; write the manifest; publish a markdown summary. A progress
artifact follows the shards as they finish.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from dino_model.data.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY
from dino_model.data.shard_writer import ShardOptions, ShardSummary, default_name, validate_request
from dino_model.data.sources import SourceSpec
from tasks.shard import (
    assemble_manifest,
    check_destination,
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

SourceKind = Literal["auto", "imagefolder", "ilsvrc-train", "ilsvrc-val", "flat"]
#: Threads available to shard tasks; the flow itself keeps at most ``parallelism`` of them busy.
MAX_THREADS = 64


@flow(name="dino-shard", task_runner=ThreadPoolTaskRunner(max_workers=MAX_THREADS), validate_parameters=True)
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
        parallelism: how many shard tasks run at once.

    Returns:
        A :class:`~dino_model.data.shard_writer.ShardSummary` (counts, shards written vs already present).
    """
    # -- 1. the input as a whole: every check here runs before anything is written ---------------------------
    if not isinstance(parallelism, int) or parallelism < 1:
        raise ValueError(f"parallelism must be a positive integer, got {parallelism!r}")
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
    outcomes: dict[int, object] = {}
    pending: dict = {}
    queue = list(plans)
    while queue or pending:
        while queue and len(pending) < parallelism:
            plan = queue.pop(0)
            future = write_shard_task.submit(
                destination, quote(plan), options, quote(scan.classes), quote(scan.class_names),
                quote(previous.get(plan.index)),
            )
            pending[future] = plan
        completed = as_completed(list(pending))
        future = next(completed)  # the first shard task to finish frees a slot
        completed.close()
        plan = pending.pop(future)
        outcomes[plan.index] = future.result()  # raises the task's error once its retries are spent
        report_progress(progress_id, len(outcomes), len(plans), options.name)

    # -- 3. manifest and summary -----------------------------------------------------------------------------
    ordered = [outcomes[p.index] for p in plans]
    manifest = assemble_manifest(scan, plans, ordered, options)
    wrote = write_manifest_task(destination, quote(manifest), quote(old_manifest))
    summary = make_summary(destination, manifest, ordered, wrote)
    publish_summary(quote(manifest), summary)
    return summary

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

from typing import Any, Literal

from prefect import Flow
from prefect.utilities.annotations import quote

from dino_model.data.shard_writer import ShardSummary
from dino_model.data.sources import SourceSpec
from tasks.flow_parameters import grouped_flow, resolve_flow_groups
from tasks.shard import (
    assemble_manifest,
    check_destination,
    collect_shard_outcomes,
    emit_progress,
    make_summary,
    plan_shards_task,
    publish_summary,
    scan_source_task,
    start_progress,
    write_manifest_task,
    write_shard_task,
)
from tasks.task_runners import open_task_runner
from tasks.validation.settings_groups import RunnerSettings
from tasks.validation.shard_settings import SHARD_GROUPS, SHARD_RENAMES, ShardRequest, ShardSettings

SourceKind = Literal["auto", "imagefolder", "ilsvrc-train", "ilsvrc-val", "flat"]


@grouped_flow(SHARD_RENAMES, name="dino-shard", validate_parameters=True)
def dino_shard(
    source: str,
    destination: str,
    kind: SourceKind = "auto",
    labels: str | None = None,
    meta: str | None = None,
    classes: str | None = None,
    classes_from: str | None = None,
    shards: ShardSettings | dict[str, Any] | None = None,
    runner: RunnerSettings | dict[str, Any] | None = None,
    **deprecated: Any,
) -> ShardSummary:
    """Shard an image dataset for DINO pretraining.

    Args:
        source: the input: an ImageFolder root (``root/<class>/*``), the ILSVRC-2012 train tar, the ILSVRC val
            images (folder or tar, with ``labels``), or a flat folder of unlabelled images.
        destination: where shards and ``manifest.json`` go: a local path, ``file:///abs/path`` or
            ``s3://bucket/prefix`` (endpoint and credentials from the standard AWS environment variables).
        kind: the input layout; ``auto`` detects it (see :mod:`dino_model.data.sources`).
        labels: ILSVRC val label file: ``LOC_val_solution.csv`` or the devkit's ground-truth ``.txt``.
        meta: the devkit's ``meta.mat`` (needed with the devkit ground truth).
        classes: optional text file listing class ids in index order (e.g. to align val with a train subset).
        classes_from: optional shard set (path or URI, usually the train set's) whose manifest's classes give the
            class indices; one of ``classes`` / ``classes_from`` at most. Without either, an ILSVRC val set whose
            labels cover fewer than 1000 classes is indexed by its own classes, with a warning.
        shards: how the shards are cut and encoded (:class:`tasks.validation.shard_settings.ShardSettings`):
            ``name`` (default: the source folder's name), ``shard_size``, ``shard_bytes``, the shuffle ``seed``,
            the re-encoding ``quality``, ``max_pixels``. A partial dict changes only its own fields of the
            deployment's.
        runner: where the shard tasks run (:class:`tasks.validation.settings_groups.RunnerSettings`):
            ``task_runner`` ``threads`` (of the flow's process), ``processes`` (of its machine), ``dask`` (a local
            Dask cluster of ``parallelism`` workers) or ``tcp://HOST:PORT`` (a running Dask scheduler; its
            workers need this project installed and the destination's credentials), with ``parallelism`` tasks at
            once.
        deprecated: the flat names these groups replaced (``shard_size=``, ``task_runner=`` ...): still accepted,
            with a warning naming the new spelling.

    Returns:
        A :class:`~dino_model.data.shard_writer.ShardSummary` (counts, shards written vs already present).
    """
    # -- 1. the input as a whole: every check here runs before anything is written ---------------------------
    groups = resolve_flow_groups(SHARD_GROUPS, {"shards": shards, "runner": runner}, deprecated, SHARD_RENAMES)
    request = ShardRequest(SourceSpec(source, kind, labels, meta, classes, classes_from), destination,
                           groups["shards"].options(source))
    request.validate()  # bad URI, missing root or label file
    return write_shard_set(request, groups["runner"])


def write_shard_set(request: ShardRequest, runner: RunnerSettings) -> ShardSummary:
    """Scan, plan and write the shards of a checked ``request`` in the calling flow run, then its manifest and
    summary: ``dino-shard`` after its checks, and each shard stage of ``dino-pipeline`` (:data:`shard_stage`)."""
    scan = scan_source_task(request.spec)  # fails when there is no image at all
    # Last check: the probe write creates the destination folder, so it runs only once everything else passed.
    destination = check_destination(request.destination)
    options = request.options

    # -- 2. plan, then write shard ranges in parallel --------------------------------------------------------
    # quote(): the scan and plans can hold millions of items; Prefect need not walk them looking for futures.
    plans, previous, old_manifest = plan_shards_task(destination, quote(scan), options)
    emit_progress("total", sum(len(p.items) for p in plans))
    progress_id = start_progress(options.name, len(plans))
    with open_task_runner(runner.task_runner, runner.parallelism) as pool:
        # Plain values, no quote(): a Dask scheduler would unpack the annotation (a tuple) into the arguments.
        futures = [
            pool.submit(write_shard_task, {
                "destination": destination, "plan": plan, "options": options, "classes": scan.classes,
                "class_names": scan.class_names, "previous": previous.get(plan.index),
            })
            for plan in plans
        ]
        ordered = collect_shard_outcomes(futures, plans, progress_id, options.name, runner.task_runner)

    # -- 3. manifest and summary -----------------------------------------------------------------------------
    manifest = assemble_manifest(scan, plans, ordered, options)
    wrote = write_manifest_task(destination, quote(manifest), quote(old_manifest))
    summary = make_summary(destination, manifest, ordered, wrote)
    publish_summary(quote(manifest), summary)
    return summary


#: A shard stage of ``dino-pipeline``: a ``dino-shard`` flow run without the request check, which the pipeline's
#: first task made for both of its sources already.
shard_stage = Flow(write_shard_set, name="dino-shard", validate_parameters=False)

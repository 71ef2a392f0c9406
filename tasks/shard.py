"""Prefect tasks of the ``dino-shard`` flow: thin wrappers over :mod:`dino_model.data` (one side effect each).

Stores (and their boto3 clients) are opened inside each task from the destination URI, never passed in. No task
caches its inputs (``cache_policy=NO_CACHE``): they read or write the world, so a cached result would be a lie.
Shard writes retry on transient storage errors; the writer's own idempotency makes a retry safe.

In-process callers (the ``dino`` CLI's progress bar) can follow progress with :func:`add_progress_listener`:
sample by sample when the shard tasks run on threads of the flow's process, shard by shard (as the flow collects
them) when they run in other processes or on a Dask cluster.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from dino_model.data.manifest import Manifest
from dino_model.data.shard_writer import (
    ShardOptions,
    ShardOutcome,
    ShardPlan,
    ShardSummary,
    build_manifest,
    finish,
    load_previous,
    plan_shards,
    summarize,
    write_shard,
)
from dino_model.data.sources import Scan, SourceSpec, require_images, scan_source
from dino_model.storage import ObjectNotFound, StorageError, open_store

from .listeners import Listeners
from .validation.task_runners import runs_in_flow_process

# -- in-process progress listeners (threads share them; tasks run in the flow's process) ----------------------

ProgressListener = Callable[[str, int], None]  #: called with ("total", n) once, then ("advance", k) repeatedly
shard_progress = Listeners()
add_progress_listener = shard_progress.add
remove_progress_listener = shard_progress.remove
emit_progress = shard_progress.emit


def _is_transient(task, task_run, state) -> bool:
    """Retry storage hiccups (network, throttling, a server restarting), not missing objects or bad input."""
    try:
        state.result()
    except ObjectNotFound:
        return False
    except (StorageError, ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - anything else is a bug or bad input: retrying won't help
        return False
    return False


# -- tasks -----------------------------------------------------------------------------------------------------


@task(name="check-destination", cache_policy=NO_CACHE)
def check_destination(destination: str) -> str:
    """Write, read back and delete a probe object at the destination; returns its canonical URI."""
    store = open_store(destination)
    store.check_writable()
    return store.uri


@task(name="scan-source", cache_policy=NO_CACHE)
def scan_source_task(spec: SourceSpec) -> Scan:
    """Find every candidate image and the scan-time rejects; fail if there is no image at all. The scan's warnings
    (e.g. val class indices that may differ from train's) are logged as WARNING."""
    scan = scan_source(spec)
    require_images(scan)
    for warning in scan.warnings:
        get_run_logger().warning("%s", warning)
    return scan


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards_task(
    destination: str, scan: Scan, options: ShardOptions
) -> tuple[list[ShardPlan], dict[int, ShardOutcome], Manifest | None]:
    """Cut the shuffled candidates into shard ranges and read what earlier runs left at the destination."""
    plans = plan_shards(scan.items, options, scan.classes, scan.class_names)
    previous, manifest = load_previous(open_store(destination), plans)
    return plans, previous, manifest


@task(
    name="write-shard",
    task_run_name="write-{plan.name}",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=_is_transient,
)
def write_shard_task(
    destination: str,
    plan: ShardPlan,
    options: ShardOptions,
    classes: list[str],
    class_names: dict[str, str],
    previous: ShardOutcome | None,
) -> ShardOutcome:
    """Write one shard range (atomically) and its progress record, or skip it if it is already there."""
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        emit_progress("advance", n)

    try:
        return write_shard(open_store(destination), plan, options, classes, class_names, previous, advance)
    except BaseException:
        emit_progress("advance", -done)  # a retry counts its samples again
        raise


@task(name="write-manifest", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30],
      retry_condition_fn=_is_transient)
def write_manifest_task(destination: str, manifest: Manifest, previous: Manifest | None) -> bool:
    """Write ``manifest.json`` if it changed, then remove progress records and stale shards; returns whether the
    manifest was written."""
    return finish(open_store(destination), manifest, previous)


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary(manifest: Manifest, summary: ShardSummary, max_rejects: int = 50) -> str:
    """A markdown artifact: totals (found = accepted + rejected), shards, reject reasons; returns the markdown."""
    markdown = summary_markdown(manifest, summary, max_rejects)
    create_markdown_artifact(markdown, key=artifact_key(manifest.name, "summary"), description="dino-shard summary")
    return markdown


# -- helpers the flow calls directly ---------------------------------------------------------------------------


def artifact_key(name: str, what: str) -> str:
    """Artifact keys may hold only lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", f"dino-shard-{name}-{what}".lower()).strip("-")


def start_progress(name: str, total_shards: int) -> object:
    return create_progress_artifact(0.0, key=artifact_key(name, "progress"),
                                    description=f"dino-shard {name}: 0/{total_shards} shards")


def report_progress(artifact_id, done_shards: int, total_shards: int, name: str) -> None:
    update_progress_artifact(artifact_id, 100.0 * done_shards / max(1, total_shards),
                             description=f"dino-shard {name}: {done_shards}/{total_shards} shards")


def collect_shard_outcomes(futures: Sequence[PrefectFuture], plans: Sequence[ShardPlan], progress_id, name: str,
                           task_runner: str) -> list[ShardOutcome]:
    """Wait for the shard tasks (``futures[i]`` writes ``plans[i]``) as they finish, updating the progress artifact
    (and, for tasks outside the flow's process, the in-process listeners); return the outcomes in plan order.
    The first task that fails once its retries are spent raises its error here."""
    index = {future.task_run_id: i for i, future in enumerate(futures)}
    outcomes: list[ShardOutcome | None] = [None] * len(futures)
    remote = not runs_in_flow_process(task_runner)
    for done, future in enumerate(as_completed(list(futures)), start=1):
        i = index[future.task_run_id]
        outcomes[i] = future.result()
        if remote:  # the task's per-sample progress stayed in its worker process
            emit_progress("advance", len(plans[i].items))
        report_progress(progress_id, done, len(plans), name)
    return outcomes


def assemble_manifest(scan: Scan, plans: list[ShardPlan], outcomes: list[ShardOutcome], options: ShardOptions) -> Manifest:
    return build_manifest(scan, plans, outcomes, options)


def make_summary(destination: str, manifest: Manifest, outcomes: list[ShardOutcome], wrote: bool) -> ShardSummary:
    return summarize(open_store(destination), manifest, outcomes, wrote)


def summary_markdown(manifest: Manifest, summary: ShardSummary, max_rejects: int = 50) -> str:
    t = manifest.totals
    lines = [
        f"# dino-shard `{manifest.name}` → `{summary.destination}`",
        "",
        f"**found {t['found']} = accepted {t['accepted']} + rejected {t['rejected']}**; "
        f"re-encoded {t['reencoded']}; {t['shards']} shards, {t['bytes'] / 1e6:.1f} MB; "
        f"written this run: {summary.written}, already present: {summary.skipped}.",
        "",
        f"Source: `{manifest.inputs.get('root')}` ({manifest.inputs.get('kind')}), {len(manifest.classes)} classes.",
        "",
    ]
    class_map = manifest.inputs.get("class_map")
    if class_map:
        lines += [f"Class map: {class_map['classes']} classes from {class_map['source']} `{class_map['path']}`, "
                  f"sha256 `{class_map['sha256'][:16]}`.", ""]
    if manifest.warnings:
        lines += [f"> **Warning:** {w}" for w in manifest.warnings] + [""]
    if manifest.rejects:
        by_reason = Counter(r.reason.split(":")[0] for r in manifest.rejects)
        lines += ["| reject reason | count |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in by_reason.most_common()]
        lines += ["", "| rejected input | reason |", "|---|---|"]
        lines += [f"| `{r.path}` | {r.reason} |" for r in manifest.rejects[:max_rejects]]
        if len(manifest.rejects) > max_rejects:
            lines.append(f"| … | {len(manifest.rejects) - max_rejects} more in manifest.json |")
        lines.append("")
    lines += ["| shard | samples | MB | re-encoded | sha256 |", "|---|---|---|---|---|"]
    lines += [f"| {s.name} | {s.samples} | {s.bytes / 1e6:.2f} | {s.reencoded} | `{s.sha256[:12]}` |"
              for s in manifest.shards[:200]]
    return "\n".join(lines) + "\n"

"""Backbone features of a shard set written as Parquet: the backbone loaded once per process, where the features
go, and the extraction tasks: the whole split in the task's process (or ``torchrun -m dino_model.eval.extract``
on several GPUs), or one task per sample range on a task runner (``processes``, ``dask``, ``tcp://...``): each
writes its own ``part-r<range>-*.parquet`` (the torchrun layout), then :func:`finish_feature_ranges` checks the
total and removes an earlier extraction's parts. ``flows.extract.extract_split`` composes them."""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from ..validation import retry_unless_user_error
from ..validation.extraction_settings import FeatureSettings
from ..validation.task_runners import check_parallelism, check_task_runner
from .common import EvaluationInputError, run_logger
from .settings import resolve_device

#: A range task's share of the samples is at most this many (more ranges than workers when the set is large, so a
#: lost worker costs little and the ranges balance); each range writes its own part file(s).
SAMPLES_PER_RANGE = 20_000

#: The last backbone loaded in this process (a flow's, a process-pool worker's, a Dask worker's): key -> CPU copy.
_BACKBONE_CACHE: dict[tuple, Any] = {}
_BACKBONE_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExtractionSpec:
    """One split's extraction, built once by the flow and passed to each of its tasks: the backbone
    (``model_uri``), the shard set (``data``, its labels through ``label_map``: val -> train class indices), where the
    features go (``<output>/<split>/``, ``metadata`` in every file), which features (``features``) and the device."""

    model_uri: str
    data: str
    output: str
    split: str
    features: FeatureSettings = field(default_factory=FeatureSettings)
    device: str = "auto"
    metadata: dict[str, Any] = field(default_factory=dict)
    label_map: list[int] | None = None

    @property
    def kind(self) -> str:
        """The feature kind (``cls``, ``cls_last4`` ...): :func:`dino_model.eval.features.feature_kind`."""
        from dino_model.eval.features import feature_kind

        return feature_kind(self.features.n_last_blocks, self.features.avgpool)

    def recipe(self):
        """The features as :func:`dino_model.eval.features.extract_features` computes them."""
        from dino_model.eval.features import FeatureRecipe
        from dino_model.eval.transforms import EvalTransform

        f = self.features
        return FeatureRecipe(EvalTransform(f.resize_size, f.crop_size), f.n_last_blocks, f.avgpool, f.precision,
                             f.fast_path_check, f.feature_dtype)

    def label_array(self):
        import numpy as np

        return np.asarray(self.label_map) if self.label_map is not None else None

    def torchrun_args(self, device: str) -> list[str]:
        """The arguments of ``torchrun -m dino_model.eval.extract`` for this extraction on ``device``."""
        f = self.features
        args = ["--model", self.model_uri, "--data", self.data, "--out", self.output, "--split", self.split,
                "--resize", str(f.resize_size), "--crop", str(f.crop_size), "--batch-size", str(f.batch_size),
                "--n-last-blocks", str(f.n_last_blocks), "--precision", f.precision, "--device", device,
                "--metadata", json.dumps(self.metadata), "--fast-path-check", f.fast_path_check,
                "--feature-dtype", f.feature_dtype]
        if f.avgpool:
            args.append("--avgpool")
        if self.label_map is not None:
            args += ["--label-map", ",".join(str(int(v)) for v in self.label_map)]
        return args


def split_summary(end: dict[str, Any], split: str) -> dict[str, Any]:
    """What an extraction of one split returns, from its end record: ``uri``, ``num_rows``, ``dim``, ``files``,
    ``feature_kind``, ``precision``, ``fast_path``."""
    return {"uri": end["uri"], "split": split, "num_rows": end["num_rows"], "dim": end["dim"], "files": end["files"],
            "feature_kind": end["feature_kind"], "precision": end["precision"], "fast_path": end["fast_path"]}


def load_model(model_uri: str, device: str, reuse_key: str | None = None):
    """The backbone of a registered version, a checkpoint or an export, in eval mode on ``device``.

    The last one loaded stays in this process: a registered version (``models:/name/N``) never changes, so the
    tasks of one evaluation download it once; any other reference is reused only under the same ``reuse_key``
    (one extraction's), so the range tasks of an extraction that land on one worker process load it once, while a
    later extraction reads the checkpoint or export afresh (it may have been overwritten)."""
    import copy

    import mlflow

    import dino_model.mlflow_model  # noqa: F401 - registers the models:/ scheme with load_backbone
    from dino_model.export import load_backbone

    if re.fullmatch(r"models:/[^/@]+/\d+", model_uri):
        key: tuple | None = (mlflow.get_tracking_uri(), model_uri)
    else:
        key = (model_uri, reuse_key) if reuse_key else None
    if key is None:
        return load_backbone(model_uri).to(device).eval()
    with _BACKBONE_LOCK:
        if key not in _BACKBONE_CACHE:
            _BACKBONE_CACHE.clear()
            _BACKBONE_CACHE[key] = load_backbone(model_uri)
        backbone = copy.deepcopy(_BACKBONE_CACHE[key])  # each task moves and runs its own copy
    return backbone.to(device).eval()


def features_location(root: str, model_name: str, version: int, set_hash: str, kind: str) -> str:
    """``<root>/<model>/v<version>/<set hash>/<kind>`` (``+`` in the kind becomes ``-``: S3-safe keys)."""
    return f"{root.rstrip('/')}/{model_name}/v{version}/{set_hash}/{kind.replace('+', '-')}"


def progress_title(spec: ExtractionSpec, samples: int, processes: int = 1) -> str:
    """The progress card's title, distinct per feature kind and split: ``features cls_last4 of models:/m/3, split
    train: 9469 samples`` (``cls``: the [CLS] token the k-NN uses; ``cls_last<n>[+avgpool]``: the probe's)."""
    text = f"features {spec.kind} of {spec.model_uri}, split {spec.split}: {samples} samples"
    return text + (f", {processes} processes" if processes > 1 else "")


@task(name="plan-feature-sets", cache_policy=NO_CACHE)
def plan_feature_sets(settings, model_name: str, version: int, set_hash: str) -> dict[str, Any]:
    """Which feature sets the selected classification evaluations read, each extracted once: the k-NN's [CLS]
    features and the fast probe's (``linear_n_last_blocks``, ``linear_avgpool``), one set when they coincide.
    Returns ``{"sets": [{"kind", "n_last_blocks", "avgpool", "uri"}, ...], "knn": kind | None,
    "linear_fast": kind | None}`` (empty sets when neither evaluation runs)."""
    from dino_model.eval.features import feature_kind

    chosen = settings.selected()
    wanted = {}
    if "knn" in chosen:
        wanted["knn"] = (1, False)
    if "linear_fast" in chosen:
        wanted["linear_fast"] = (settings.linear_n_last_blocks, settings.linear_avgpool)
    sets = []
    for n_last_blocks, avgpool in dict.fromkeys(wanted.values()):
        kind = feature_kind(n_last_blocks, avgpool)
        sets.append({"kind": kind, "n_last_blocks": n_last_blocks, "avgpool": avgpool,
                     "uri": features_location(settings.features_root, model_name, version, set_hash, kind)})
    return {"sets": sets, **{evaluation: feature_kind(*wanted[evaluation]) if evaluation in wanted else None
                             for evaluation in ("knn", "linear_fast")}}


class _Progress:
    """Reports extraction progress as a Prefect progress artifact (at most every 2 s) inside a run."""

    def __init__(self, total: int, description: str):
        self.total, self.done, self.last = max(total, 1), 0, 0.0
        self.id = None
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return  # called outside a run (the task's .fn): nothing to report to
        try:
            self.id = create_progress_artifact(0.0, description=description)
        except Exception as e:  # noqa: BLE001 - progress is a convenience; the extraction goes on without it
            run_logger().warning("no progress artifact: %s", e)

    def wrap(self, batches: Iterable):
        for batch in batches:
            yield batch
            self.done += len(batch[0])
            if self.id is not None and time.monotonic() - self.last > 2.0:
                self.last = time.monotonic()
                update_progress_artifact(self.id, 100.0 * self.done / self.total)

    def finish(self):
        if self.id is not None:
            update_progress_artifact(self.id, 100.0)


@task(name="extract-features", cache_policy=NO_CACHE)
def extract_split_features(spec: ExtractionSpec, nproc_per_node: int = 1) -> dict[str, Any]:
    """Run the backbone over every sample of the shard set ``spec.data`` (in order, none dropped) and write
    ``<output>/<split>/part-*.parquet``. Checks that the rows written equal the manifest's sample count.
    ``nproc_per_node > 1``: the extraction runs as ``torchrun -m dino_model.eval.extract`` child processes (one per
    GPU), rank 0 checking the total. With bf16, ``fast_path_check`` decides what a failed bf16-vs-fp32 check on the
    first batch does (see :func:`dino_model.eval.features.check_precision`); the result's ``precision`` is what ran
    and ``fast_path`` the verdict."""
    from dino_model.eval.extract import feature_metadata
    from dino_model.eval.features import extract_features
    from dino_model.eval.shard_source import EvalShardSet

    logger = run_logger()
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if nproc_per_node > 1:
        return _extract_with_torchrun(spec, nproc_per_node)
    device = resolve_device(spec.device)
    shards = EvalShardSet(spec.data)
    backbone = load_model(spec.model_uri, device)
    progress = _Progress(shards.num_samples, progress_title(spec, shards.num_samples))
    res = extract_features(
        backbone, progress.wrap(shards.batches(spec.features.batch_size, spec.label_array())), spec.output, spec.split,
        feature_metadata(spec.metadata, spec.model_uri, shards), recipe=spec.recipe(), device=device, progress=False,
        total=shards.num_samples,
    )
    progress.finish()
    if res.num_rows != shards.num_samples:
        raise RuntimeError(f"wrote {res.num_rows} feature rows for {shards.num_samples} samples of {shards.uri}")
    logger.info("%s: %d x %d features (%s) -> %s", spec.split, res.num_rows, res.dim, res.metadata["feature_kind"],
                res.uri)
    return split_summary({**res.metadata, "uri": res.uri, "num_rows": res.num_rows, "dim": res.dim,
                          "files": res.files}, spec.split)


def _extract_with_torchrun(spec: ExtractionSpec, nproc_per_node: int) -> dict[str, Any]:
    """The multi-process extraction: ``torchrun -m dino_model.eval.extract``, its output forwarded to the run logs
    and its per-rank progress records summed into the progress artifact."""
    import torch

    from dino_model.eval.shard_source import EvalShardSet

    from ..pretrain.trainer_process import LaunchSpec, run_trainer, torchrun_command

    logger = run_logger()
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        raise EvaluationInputError(f"device {device!r} names one GPU, but nproc_per_node={nproc_per_node} processes "
                                   "take one GPU each (cuda:<local rank>): use device 'cuda' or 'auto'")
    resolve_device(device)
    shards = EvalShardSet(spec.data)
    cmd = torchrun_command(LaunchSpec(nproc_per_node=nproc_per_node), None, spec.torchrun_args(device),
                           module="dino_model.eval.extract")
    progress = _Progress(shards.num_samples, progress_title(spec, shards.num_samples, nproc_per_node))
    done_by_rank: dict[int, int] = {}

    def on_progress(record: dict) -> None:
        if record.get("event") == "step":
            done_by_rank[int(record["rank"])] = int(record["done"])
            progress.done = sum(done_by_rank.values())
            if progress.id is not None and time.monotonic() - progress.last > 2.0:
                progress.last = time.monotonic()
                update_progress_artifact(progress.id, 100.0 * progress.done / progress.total)

    logger.info("launching %s", " ".join(cmd[:8]) + " ...")
    end = run_trainer(cmd, {}, on_line=logger.info, on_progress=on_progress)
    progress.finish()
    if end is None or end.get("num_rows") != shards.num_samples:
        raise RuntimeError(f"the torchrun extraction of {shards.uri} reported {end and end.get('num_rows')} rows "
                           f"for {shards.num_samples} samples")
    logger.info("%s: %d x %d features (%s) -> %s, %d processes", spec.split, end["num_rows"], end["dim"],
                end["feature_kind"], end["uri"], nproc_per_node)
    return split_summary(end, spec.split)


# -- one task per sample range, on a task runner ------------------------------------------------------------------


@task(name="plan-feature-ranges", cache_policy=NO_CACHE)
def plan_feature_ranges(data: str, slots: int, task_runner: str, workers: int) -> dict[str, Any]:
    """How the range tasks of one extraction of ``data`` go: ``count`` contiguous sample ranges (at least one per
    worker slot, at most :data:`SAMPLES_PER_RANGE` samples each, never more than the samples), the ``reuse_key``
    under which a worker process keeps the backbone between its range tasks, and ``torch_threads`` per task (the
    cores of this machine shared by the ``workers`` of a local runner; None for a remote cluster's workers)."""
    from dino_model.eval.shard_source import EvalShardSet

    check_task_runner(task_runner)
    check_parallelism(workers, "workers")
    n = EvalShardSet(data).num_samples
    count = max(1, min(n, max(slots, math.ceil(n / SAMPLES_PER_RANGE))))
    local = task_runner in ("processes", "dask")
    return {"count": count, "reuse_key": uuid.uuid4().hex,
            "torch_threads": max(1, (os.cpu_count() or 1) // workers) if local else None}


@task(name="check-feature-precision", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=retry_unless_user_error)
def check_feature_precision(spec: ExtractionSpec, reuse_key: str | None = None,
                            torch_threads: int | None = None) -> dict[str, Any]:
    """The extraction's fast-path verdict, decided once for all its range tasks (so every range runs in the same
    precision): bf16 against fp32 on the first batch of ``spec.data``
    (:func:`dino_model.eval.features.check_precision`), on the runner's worker, which keeps the backbone for its
    first range (``reuse_key``). ``fp32`` or ``off`` need no model. Returns the verdict's record."""
    import torch

    from dino_model.eval.features import check_precision, prepare_batch
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.fast_path import OFF, REFERENCE, Verdict

    f = spec.features
    if f.precision == "fp32":
        return Verdict("extract", REFERENCE, "fp32").as_record()
    if f.fast_path_check == "off":
        return Verdict("extract", OFF, "bf16 autocast").as_record()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = resolve_device(spec.device)
    shards = EvalShardSet(spec.data)
    first = (0, min(f.batch_size, shards.num_samples))
    _, images, _ = next(iter(shards.batches(f.batch_size, None, sample_range=first)))
    backbone = load_model(spec.model_uri, device, reuse_key)
    verdict, _ = check_precision(backbone, prepare_batch(images, spec.recipe().transform).to(device), f.precision,
                                 f.fast_path_check, f.n_last_blocks, f.avgpool)
    log = run_logger().warning if verdict.fell_back else run_logger().info
    log("fast path extract (%s): %s", spec.data, verdict.text)
    return verdict.as_record()


@task(name="extract-feature-range", task_run_name="features-{spec.split}-range-{index}-of-{count}",
      cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_user_error)
def extract_feature_range(spec: ExtractionSpec, index: int, count: int, reuse_key: str | None = None,
                          torch_threads: int | None = None, fast_path: dict[str, Any] | None = None) -> dict[str, Any]:
    """Features of sample range ``index`` of ``count`` (:meth:`EvalShardSet.rank_range`) of ``spec.data``, written
    to ``<output>/<split>/part-r<index>-*.parquet`` with the single-process metadata; the backbone comes from this
    process's cache when an earlier range of the same extraction (``reuse_key``) loaded it. A rerun (a retry, or a
    Dask worker lost) rewrites the same files. ``fast_path``: the extraction's verdict
    (:func:`check_feature_precision`), which sets the precision every range runs in. Returns the range's summary
    for :func:`finish_feature_ranges`."""
    import torch

    from dino_model.eval.extract import RangeExtraction, extract_range, feature_metadata
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.fast_path import Verdict

    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = resolve_device(spec.device)
    shards = EvalShardSet(spec.data)
    decided = Verdict.from_record("extract", fast_path) if fast_path is not None else None
    job = RangeExtraction(shards, spec.output, spec.split, feature_metadata(spec.metadata, spec.model_uri, shards),
                          spec.recipe(), spec.features.batch_size, spec.label_array())
    summary = extract_range(job, lambda: load_model(spec.model_uri, device, reuse_key), index, count,
                            device=torch.device(device),
                            decide=(lambda check: decided) if decided is not None else None)
    run_logger().info("%s range %d/%d: samples %s, %d rows", spec.split, index + 1, count, summary["range"],
                      summary["num_rows"])
    return summary


def collect_feature_ranges(futures: Sequence[PrefectFuture], spec: ExtractionSpec,
                           task_runner: str) -> list[dict[str, Any]]:
    """Wait for the ``extract-feature-range`` tasks as they finish, reporting them in a progress artifact
    ("features train (cls): 3/8 ranges, 12,000 rows"); return their summaries. The first range that fails once
    its retries are spent raises its error here."""
    title = f"features {spec.split} ({spec.kind}) of {spec.data} on {task_runner}"
    progress = create_progress_artifact(0.0, description=f"{title}: 0/{len(futures)} ranges")
    summaries, rows = [], 0
    for done, future in enumerate(as_completed(list(futures)), start=1):
        summaries.append(future.result())
        rows += summaries[-1]["num_rows"]
        update_progress_artifact(progress, 100.0 * done / len(futures),
                                 description=f"{title}: {done}/{len(futures)} ranges, {rows:,} rows")
    return summaries


@task(name="finish-feature-ranges", cache_policy=NO_CACHE)
def finish_feature_ranges(spec: ExtractionSpec, summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Once every range task is done: the rows written must equal the manifest's sample count and every part
    reported must be there; an earlier extraction's parts are deleted. Returns what :func:`extract_split_features`
    returns."""
    from dino_model.eval.extract import finish
    from dino_model.eval.shard_source import EvalShardSet

    shards = EvalShardSet(spec.data)
    end = finish(spec.output, spec.split, sorted(summaries, key=lambda s: s["rank"]), shards.num_samples, shards.uri,
                 spec.kind)
    run_logger().info("%s: %d x %d features (%s) -> %s, %d range tasks", spec.split, end["num_rows"], end["dim"],
                      end["feature_kind"], end["uri"], end["world_size"])
    return split_summary(end, spec.split)

"""Backbone features of a shard set written as Parquet: the backbone loaded once per process, where the features
go, and the extraction task (in the task's process, or ``torchrun -m dino_model.eval.extract`` on several GPUs)."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Iterable

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from .common import EvaluationInputError, run_logger
from .settings import resolve_device


#: The last registered version loaded in this process: ``(tracking URI, models:/name/N) -> CPU backbone``. A
#: registered version never changes, so the tasks of one evaluation download it once, not once per task.
_VERSION_CACHE: dict[tuple[str, str], Any] = {}


def load_model(model_uri: str, device: str):
    """The backbone of a registered version, a checkpoint or an export, in eval mode on ``device``."""
    import copy

    import mlflow

    import dino_model.mlflow_model  # noqa: F401 - registers the models:/ scheme with load_backbone
    from dino_model.export import load_backbone

    key = (mlflow.get_tracking_uri(), model_uri) if re.fullmatch(r"models:/[^/@]+/\d+", model_uri) else None
    if key is not None and key in _VERSION_CACHE:
        backbone = copy.deepcopy(_VERSION_CACHE[key])
    else:
        backbone = load_backbone(model_uri)
        if key is not None:
            _VERSION_CACHE.clear()
            _VERSION_CACHE[key] = copy.deepcopy(backbone)
    return backbone.to(device).eval()


def features_location(root: str, model_name: str, version: int, set_hash: str, kind: str) -> str:
    """``<root>/<model>/v<version>/<set hash>/<kind>`` (``+`` in the kind becomes ``-``: S3-safe keys)."""
    return f"{root.rstrip('/')}/{model_name}/v{version}/{set_hash}/{kind.replace('+', '-')}"


def progress_title(split: str, model_uri: str, n_last_blocks: int, avgpool: bool, samples: int,
                   processes: int = 1) -> str:
    """The progress card's title, distinct per feature kind and split: ``features cls_last4 of models:/m/3, split
    train: 9469 samples`` (``cls``: the [CLS] token the k-NN uses; ``cls_last<n>[+avgpool]``: the probe's)."""
    from dino_model.eval.features import feature_kind

    text = f"features {feature_kind(n_last_blocks, avgpool)} of {model_uri}, split {split}: {samples} samples"
    return text + (f", {processes} processes" if processes > 1 else "")


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
def extract_split_features(
    model_uri: str,
    data: str,
    out_uri: str,
    split: str,
    metadata: dict[str, Any],
    resize_size: int | None = 256,
    crop_size: int | None = 224,
    batch_size: int = 64,
    n_last_blocks: int = 1,
    avgpool: bool = False,
    precision: str = "fp32",
    device: str = "auto",
    label_map: list[int] | None = None,
    nproc_per_node: int = 1,
    fast_path_check: str = "fallback",
) -> dict[str, Any]:
    """Run the backbone over every sample of the shard set ``data`` (in order, none dropped) and write
    ``<out_uri>/<split>/part-*.parquet``. Labels go through ``label_map`` (val -> train class indices). Checks
    that the rows written equal the manifest's sample count. ``nproc_per_node > 1``: the extraction runs as
    ``torchrun -m dino_model.eval.extract`` child processes (one per GPU), rank 0 checking the total. With bf16,
    ``fast_path_check`` decides what a failed bf16-vs-fp32 check on the first batch does (see
    :func:`dino_model.eval.features.check_precision`); the result's ``precision`` is what ran and ``fast_path``
    the verdict."""
    import numpy as np

    from dino_model.eval.features import extract_features
    from dino_model.eval.shard_source import EvalShardSet
    from dino_model.eval.transforms import EvalTransform

    logger = run_logger()
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if nproc_per_node > 1:
        return _extract_with_torchrun(model_uri, data, out_uri, split, metadata, resize_size, crop_size, batch_size,
                                      n_last_blocks, avgpool, precision, device, label_map, nproc_per_node,
                                      fast_path_check)
    device = resolve_device(device)
    shards = EvalShardSet(data)
    backbone = load_model(model_uri, device)
    progress = _Progress(shards.num_samples, progress_title(split, model_uri, n_last_blocks, avgpool,
                                                            shards.num_samples))
    meta = {**metadata, "model_uri": model_uri, "data": shards.uri, "data_digest": shards.digest(),
            "classes_from": metadata.get("classes_from", shards.uri)}
    res = extract_features(
        backbone,
        progress.wrap(shards.batches(batch_size, np.asarray(label_map) if label_map is not None else None)),
        out_uri, split, meta, transform=EvalTransform(resize_size, crop_size), n_last_blocks=n_last_blocks,
        avgpool=avgpool, precision=precision, device=device, progress=False, total=shards.num_samples,
        fast_path_check=fast_path_check,
    )
    progress.finish()
    if res.num_rows != shards.num_samples:
        raise RuntimeError(f"wrote {res.num_rows} feature rows for {shards.num_samples} samples of {shards.uri}")
    logger.info("%s: %d x %d features (%s) -> %s", split, res.num_rows, res.dim, res.metadata["feature_kind"],
                res.uri)
    return {"uri": res.uri, "split": split, "num_rows": res.num_rows, "dim": res.dim, "files": res.files,
            "feature_kind": res.metadata["feature_kind"], "precision": res.metadata["precision"],
            "fast_path": res.metadata["fast_path"]}


def _extract_with_torchrun(model_uri, data, out_uri, split, metadata, resize_size, crop_size, batch_size,
                           n_last_blocks, avgpool, precision, device, label_map, nproc_per_node,
                           fast_path_check) -> dict[str, Any]:
    """The multi-process extraction: ``torchrun -m dino_model.eval.extract``, its output forwarded to the run logs
    and its per-rank progress records summed into the progress artifact."""
    import torch

    from dino_model.eval.shard_source import EvalShardSet

    from ..trainer_process import LaunchSpec, run_trainer, torchrun_command

    logger = run_logger()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda:"):
        raise EvaluationInputError(f"device {device!r} names one GPU, but nproc_per_node={nproc_per_node} processes "
                                   "take one GPU each (cuda:<local rank>): use device 'cuda' or 'auto'")
    resolve_device(device)
    shards = EvalShardSet(data)
    args = ["--model", model_uri, "--data", data, "--out", out_uri, "--split", split,
            "--resize", str(resize_size), "--crop", str(crop_size), "--batch-size", str(batch_size),
            "--n-last-blocks", str(n_last_blocks), "--precision", precision, "--device", device,
            "--metadata", json.dumps(metadata), "--fast-path-check", fast_path_check]
    if avgpool:
        args.append("--avgpool")
    if label_map is not None:
        args += ["--label-map", ",".join(str(int(v)) for v in label_map)]
    cmd = torchrun_command(LaunchSpec(nproc_per_node=nproc_per_node), None, args, module="dino_model.eval.extract")
    progress = _Progress(shards.num_samples, progress_title(split, model_uri, n_last_blocks, avgpool,
                                                            shards.num_samples, nproc_per_node))
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
    logger.info("%s: %d x %d features (%s) -> %s, %d processes", split, end["num_rows"], end["dim"],
                end["feature_kind"], end["uri"], nproc_per_node)
    return {"uri": end["uri"], "split": split, "num_rows": end["num_rows"], "dim": end["dim"],
            "files": end["files"], "feature_kind": end["feature_kind"], "precision": end["precision"],
            "fast_path": end["fast_path"]}

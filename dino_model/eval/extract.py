"""Feature extraction of a shard set to Parquet, in one process or several (torchrun): plain PyTorch, no Prefect.

One process (what ``dino extract`` runs in-process by default)::

    python -m dino_model.eval.extract --model models:/dino-backbone/3 --data s3://b/imagenette/val \\
        --out s3://b/features/v3 --split val --classes-from s3://b/imagenette/train --resize 146 --crop 128

Several GPUs of one machine (one process per GPU; ``dino extract --nproc-per-node G`` launches exactly this)::

    torchrun --standalone --nproc_per_node=G -m dino_model.eval.extract --model ... --data ... --out ... --split train

Rank ``r`` of ``W`` reads the contiguous sample range :meth:`EvalShardSet.rank_range` ``(r, W)`` of the manifest
order (disjoint, covering the set: every sample exactly once overall) on ``cuda:<LOCAL_RANK>`` (or the CPU) and
writes its own parts ``<out>/<split>/part-r<rank>-<n>.parquet`` through :mod:`dino_model.storage`.
:func:`dino_model.eval.features.read_features` reads the parts in (rank, part) order, i.e. the single-process row
order. Then rank 0 waits for every rank (barrier), checks that the row counts add up to the manifest's sample
count and that every part file reported is there, and deletes the parts of an earlier extraction of the split.

The ranks exchange only that bookkeeping (a few Python objects and a barrier), never tensors, so the process
group is gloo on CPU and GPU alike (NCCL would add nothing but a CUDA-device requirement on the collectives).
With ``--precision bf16`` rank 0 checks bf16 against fp32 on its first batch (``--fast-path-check``, see
:func:`dino_model.eval.features.check_precision`) and every rank extracts in the precision rank 0's verdict gives;
the verdict is in the files' metadata and the ``end`` record (``fast_path``).

The same per-range extraction (:func:`extract_range`) and final check (:func:`finish`) run as Prefect tasks on
a task runner (``dino extract --task-runner dask``: one task per sample range on a Dask cluster, see
:mod:`tasks.evaluation.features`), with the same part files.

Progress goes to stdout as ``DINO_PROGRESS`` lines (:mod:`dino_model.metrics`): ``{"event": "step", "rank": r,
"done": n, "total": rank_total}`` per batch (at most every 2 s), and on rank 0 a final ``{"event": "end", ...}``
with the summary (``num_rows``, ``dim``, ``feature_kind``, ``uri``, ``files``) — what the ``extract-features``
task reads back. A failure prints an ``error`` record with the message and exits non-zero (torchrun then stops
the other ranks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from dino_model.fast_path import Verdict, on_rank0
from dino_model.metrics import emit_progress
from dino_model.parent_death import exit_with_parent_from_env

from .features import FeatureRecipe, delete_stale_parts, extract_features, feature_kind, list_feature_files
from .shard_source import EvalShardSet
from .transforms import EvalTransform


def _size_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "0") else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dino_model.eval.extract", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="models:/NAME/VERSION, a checkpoint or an export folder")
    p.add_argument("--data", required=True, help="shard set (folder or s3:// prefix with manifest.json)")
    p.add_argument("--out", required=True, help="Parquet dataset root (folder or s3:// prefix)")
    p.add_argument("--split", default="train", help="split name (rows' split and sub-folder; default train)")
    p.add_argument("--classes-from", help="training shard set whose class indices the labels use")
    p.add_argument("--label-map", help="comma-separated class index map (this set's index -> training index); "
                                       "overrides --classes-from")
    p.add_argument("--resize", type=_size_or_none, default=256, help="short side before the crop (256; none)")
    p.add_argument("--crop", type=_size_or_none, default=224, help="centre-crop side (224; none)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass and process (64)")
    p.add_argument("--n-last-blocks", type=int, default=1, help="[CLS] of the last n blocks (1: k-NN features)")
    p.add_argument("--avgpool", action="store_true", help="append the average of the last block's patch tokens")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="inference precision (fp32)")
    p.add_argument("--fast-path-check", default="fallback", choices=["fallback", "strict", "off"],
                   help="bf16: check it against fp32 on the first batch; fallback (default) extracts in fp32 when "
                        "the check fails, strict fails instead, off skips the check")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"],
                   help="how the features are stored (float32; float16 halves the bytes)")
    p.add_argument("--device", default="auto", help="auto (cuda:<LOCAL_RANK> when present), cpu, cuda, cuda:1")
    p.add_argument("--metadata", default="{}", help="JSON object stored in every file (model name, version...)")
    p.add_argument("--rows-per-file", type=int, default=100_000, help="rows per Parquet part (100000)")
    p.add_argument("--barrier-timeout-s", type=float, default=6 * 3600.0,
                   help="how long the ranks wait for each other at the end (a rank that crashes is stopped by "
                        "torchrun; this only bounds a hung one)")
    return p


def resolve_rank_device(device: str, local_rank: int, distributed: bool) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is present, else the CPU; ``cuda`` -> ``cuda:<local_rank>``
    under torchrun (one GPU per process); anything else as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and distributed:
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device is {device!r} but there is no CUDA GPU")
        torch.cuda.set_device(dev)
    return dev


def _load_backbone(model: str) -> torch.nn.Module:
    import dino_model.mlflow_model  # noqa: F401 - registers the models:/ scheme with load_backbone
    from dino_model.export import load_backbone

    return load_backbone(model)


def feature_metadata(metadata: dict[str, Any], model_uri: str, shards: EvalShardSet,
                     classes_from: str | None = None) -> dict[str, Any]:
    """What every part file of an extraction records besides the caller's ``metadata``: the model, the shard set
    and its digest, and the set whose class indices the labels use."""
    return {**metadata, "model_uri": model_uri, "data": shards.uri, "data_digest": shards.digest(),
            "classes_from": metadata.get("classes_from", classes_from or shards.uri)}


@dataclass(frozen=True)
class RangeExtraction:
    """One extraction of a shard set, split into sample ranges: what is read (``shards`` in batches of
    ``batch_size``, labels through ``label_map``), which features (``recipe``) and where they go
    (``<out>/<split>/``, ``rows_per_file`` rows per part, ``meta`` in every file, see :func:`feature_metadata`)."""

    shards: EvalShardSet
    out: str
    split: str
    meta: dict[str, Any]
    recipe: FeatureRecipe
    batch_size: int = 64
    label_map: np.ndarray | None = None
    rows_per_file: int = 100_000


def extract_range(
    job: RangeExtraction,
    load_backbone: Callable[[], torch.nn.Module],
    rank: int,
    world_size: int,
    *,
    device: torch.device,
    part_names: bool = True,
    on_batches: Callable[[Iterable, int], Iterable] | None = None,
    decide: Callable[[Callable[[], Verdict]], Verdict] | None = None,
) -> dict[str, Any]:
    """Extract the sample range ``rank`` of ``world_size`` (:meth:`EvalShardSet.rank_range`) of ``job.shards`` into
    ``<out>/<split>/part-r<rank>-*.parquet`` (``part_names=False``: ``part-*.parquet``, a single process's);
    ``load_backbone`` is called only when the range holds samples. ``on_batches(batches, total)`` may wrap the
    batch iterator (progress reports). With bf16, the recipe's ``fast_path_check`` and ``decide`` settle the
    precision on the first batch (:func:`dino_model.eval.features.check_precision`; under torchrun ``decide`` is
    rank 0's verdict, which every rank takes part in). Returns the range's summary, as :func:`finish` takes it."""
    start, stop = job.shards.rank_range(rank, world_size)
    summary: dict[str, Any] = {"rank": rank, "num_rows": 0, "names": [], "dim": None, "range": [start, stop]}
    if stop == start:  # more ranges than samples: nothing to do but take part in the verdict
        if decide is not None:
            decide(lambda: None)
        return summary
    backbone = load_backbone()
    batches = job.shards.batches(job.batch_size, job.label_map, sample_range=(start, stop))
    if on_batches is not None:
        batches = on_batches(batches, stop - start)
    res = extract_features(
        backbone, batches, job.out, job.split, job.meta, recipe=job.recipe, device=device,
        rows_per_file=job.rows_per_file, progress=False, total=stop - start, rank=rank if part_names else None,
        decide=decide,
    )
    summary.update(num_rows=res.num_rows, names=res.names, dim=res.dim, uri=res.uri,
                   feature_kind=res.metadata["feature_kind"], files=res.files, fast_path=res.metadata["fast_path"],
                   precision=res.metadata["precision"])
    return summary


def run(args: argparse.Namespace, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> dict[str, Any]:
    """Extract this rank's share; return its summary (``num_rows``, ``names``, ``dim``...)."""
    distributed = world_size > 1
    device = resolve_rank_device(args.device, local_rank, distributed)
    shards = EvalShardSet(args.data)
    if args.label_map:
        label_map = np.array([int(v) for v in args.label_map.split(",")], dtype=np.int64)
    elif args.classes_from:
        label_map = shards.label_map_to(EvalShardSet(args.classes_from).classes)
    else:
        label_map = None
    user_meta = json.loads(args.metadata)
    if not isinstance(user_meta, dict):
        raise ValueError("--metadata must be a JSON object")
    meta = feature_metadata(user_meta, args.model, shards, args.classes_from)
    last = [0.0]
    done = [0]

    def reported(batches, total):
        for batch in batches:
            yield batch
            done[0] += len(batch[0])
            if time.monotonic() - last[0] > 2.0 or done[0] == total:
                last[0] = time.monotonic()
                emit_progress("step", rank=rank, done=done[0], total=total, split=args.split)

    decide = (lambda check: on_rank0(check, rank == 0)) if distributed else None
    recipe = FeatureRecipe(EvalTransform(args.resize, args.crop), args.n_last_blocks, args.avgpool, args.precision,
                           args.fast_path_check, args.feature_dtype)
    job = RangeExtraction(shards, args.out, args.split, meta, recipe, args.batch_size, label_map, args.rows_per_file)
    return extract_range(job, lambda: _load_backbone(args.model).to(device).eval(), rank, world_size, device=device,
                         part_names=distributed, on_batches=reported, decide=decide)


def finish(out: str, split: str, summaries: list[dict[str, Any]], expected: int, data: str,
           kind: str) -> dict[str, Any]:
    """Once every range is done (rank 0 of torchrun, or the flow after its range tasks): check that the row counts
    add up to ``expected`` (the manifest's sample count of ``data``) and that every part file reported is under
    ``<out>/<split>/``, delete the parts of an earlier extraction, and summarise."""
    total = sum(s["num_rows"] for s in summaries)
    if total != expected:
        per_rank = {s["rank"]: s["num_rows"] for s in summaries}
        raise RuntimeError(f"wrote {total} feature rows for {expected} samples of {data} (per rank: {per_rank})")
    names = [n for s in summaries for n in s["names"]]
    found = {key.split("/", 1)[1] for _, key in list_feature_files(out, split)}
    missing = sorted(set(names) - found)
    if missing:
        raise RuntimeError(f"part files reported written but not found under {out}/{split}: {missing}")
    delete_stale_parts(out, split, names)
    first = next(s for s in summaries if s["num_rows"] > 0)
    return {"uri": first["uri"], "split": split, "num_rows": total, "dim": first["dim"], "feature_kind": kind,
            "files": [f for s in summaries for f in s.get("files", [])], "world_size": len(summaries),
            "precision": first["precision"], "fast_path": first["fast_path"]}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    exit_with_parent_from_env()  # launched by the extract task: stop when torchrun or the task's process dies
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.barrier_timeout_s))
    try:
        summary = run(args, rank, world_size, local_rank)
        if distributed:
            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, summary)  # also the barrier: every rank has written its parts
            summaries = sorted(gathered, key=lambda s: s["rank"])
        else:
            summaries = [summary]
        if rank == 0:
            result = finish(args.out, args.split, summaries, EvalShardSet(args.data).num_samples, args.data,
                            feature_kind(args.n_last_blocks, args.avgpool))
            emit_progress("end", **result)
        if distributed:
            dist.barrier()  # the others wait for rank 0's verification (and its exit status) before leaving
    except Exception as e:  # noqa: BLE001 - reported as a progress record, then re-raised for the exit status
        emit_progress("error", rank=rank, message=f"{type(e).__name__}: {e}")
        raise
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

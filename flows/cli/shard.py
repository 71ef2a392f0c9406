"""``dino shard``: an image dataset into WebDataset tars + manifest (the ``dino-shard`` flow), with a progress bar.

    dino shard ../shared/data/imagenette-128/train s3://bucket/imagenette/train --shard-size 500
    dino shard ILSVRC2012_img_val.tar /data/shards/val --labels LOC_val_solution.csv
    dino shard /data/train s3://bucket/train --task-runner dask --parallelism 8     # a local Dask cluster
    dino shard /data/train s3://bucket/train --task-runner tcp://10.0.0.5:8786      # a running Dask scheduler
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import asdict

from .common import UsageError, add_task_runner_option, command, parse_bytes
from .prefect_session import flow_session


def _configure_shard(p: argparse.ArgumentParser) -> None:
    from dino_model.data.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY

    p.add_argument("source", metavar="SRC", help="ImageFolder root, ILSVRC train tar, ILSVRC val folder/tar, or flat folder")
    p.add_argument("destination", metavar="DEST", help="local path, file:///path or s3://bucket/prefix")
    p.add_argument("--name", help="shard name prefix (default: the source folder's name)")
    p.add_argument("--kind", default="auto", choices=["auto", "imagefolder", "ilsvrc-train", "ilsvrc-val", "flat"],
                   help="input layout (default: detect)")
    p.add_argument("--labels", help="ILSVRC val labels: LOC_val_solution.csv or the devkit ground-truth .txt")
    p.add_argument("--meta", help="the devkit's meta.mat (with the devkit ground truth)")
    p.add_argument("--classes", help="text file of class ids in index order (e.g. LOC_synset_mapping.txt)")
    p.add_argument("--classes-from", metavar="SHARDS",
                   help="take the class indices from this shard set's manifest (path or URI; usually the train "
                        "set's), so val labels use train's indices")
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000; 0: no limit)")
    p.add_argument("--shard-bytes", type=parse_bytes, default=None, help="target input bytes per shard, e.g. 500MB")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit in pixels")
    p.add_argument("--parallelism", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                   help="shard tasks at once: threads, processes or local Dask workers (default: CPU count, 2..8)")
    add_task_runner_option(p, "shard tasks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("shard", "shard an image dataset into WebDataset tars + manifest (the dino-shard flow)", _configure_shard)
def run_shard(args: argparse.Namespace) -> int:
    # The progress bar is the CLI's display; Prefect's INFO lines would tear it (user settings still win).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from tqdm import tqdm

    from dino_model.data.sources import SourceSpec
    from dino_model.storage import StorageError
    from tasks.validation.settings_groups import RunnerSettings
    from tasks.validation.shard_settings import ShardRequest, ShardSettings

    bar = None

    def on_progress(event: str, value: int) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if event == "total":
            bar = tqdm(total=value, unit="img", desc=f"dino shard {args.name or ''}".strip(), dynamic_ncols=True)
        elif bar is not None:
            bar.update(value)

    if args.parallelism < 1:
        raise UsageError(f"--parallelism must be >= 1, got {args.parallelism}")
    try:  # the same cheap checks the flow starts with, before paying for Prefect's start-up
        shards = ShardSettings(name=args.name, shard_size=args.shard_size or None, shard_bytes=args.shard_bytes,
                               seed=args.seed, quality=args.quality, max_pixels=args.max_pixels)
        ShardRequest(SourceSpec(args.source, args.kind, args.labels, args.meta, args.classes, args.classes_from),
                     args.destination, shards.options(args.source)).validate()
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e
    runner = RunnerSettings(task_runner=args.task_runner, parallelism=args.parallelism)

    from flows.shard import dino_shard
    from tasks.shard import add_progress_listener, remove_progress_listener

    add_progress_listener(on_progress)
    session = contextlib.ExitStack()  # closed last, in `finally`: the flow's server settles once the bar is closed
    session.enter_context(flow_session(reported=(ValueError, OSError, StorageError), debug=args.debug))
    try:
        summary = dino_shard(source=args.source, destination=args.destination, kind=args.kind, labels=args.labels,
                             meta=args.meta, classes=args.classes, classes_from=args.classes_from, shards=shards,
                             runner=runner)
    except (ValueError, OSError, StorageError) as e:
        raise UsageError(str(e)) from e
    finally:
        remove_progress_listener(on_progress)
        if bar is not None:
            bar.close()
        session.close()
    s = asdict(summary)
    print(
        f"found {s['found']} = accepted {s['accepted']} + rejected {s['rejected']} (re-encoded {s['reencoded']}); "
        f"{s['shards']} shards ({s['written']} written, {s['skipped']} already there), {s['bytes'] / 1e6:.1f} MB\n"
        f"manifest: {s['manifest']}"
    )
    for warning in s["warnings"]:
        print(f"WARNING: {warning}")
    return 0

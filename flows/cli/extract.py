"""``dino extract``: a backbone's features of one shard set written as Parquet (the ``dino-extract`` flow).

    dino extract models:/dino-backbone@champion s3://bucket/imagenette/val s3://bucket/features/v3 --split val \\
        --classes-from s3://bucket/imagenette/train
    dino extract models:/dino-backbone/3 s3://bucket/imagenet/train s3://bucket/features/v3 \
        --task-runner tcp://10.0.0.5:8786          # one task per sample range on a running Dask cluster
"""

from __future__ import annotations

import argparse

from .common import (
    UsageError,
    add_task_runner_option,
    command,
    print_warnings,
    size_or_none,
    use_registry,
)
from .prefect_session import flow_session


def _configure_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="models:/NAME/VERSION, models:/NAME@ALIAS, a checkpoint or an export")
    p.add_argument("data", metavar="DATA", help="shard set (folder or s3:// prefix with manifest.json)")
    p.add_argument("output", metavar="OUTPUT", help="Parquet dataset root (folder or s3:// prefix)")
    p.add_argument("--split", default="train", help="split name: rows' split and the sub-folder (default train)")
    p.add_argument("--classes-from", metavar="TRAIN", help="training shard set whose class indices the labels use")
    p.add_argument("--resize", type=size_or_none, default=256, help="short side before the crop (default 256; none)")
    p.add_argument("--crop", type=size_or_none, default=224, help="centre-crop side (default 224; none)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--n-last-blocks", type=int, default=1, help="[CLS] of the last n blocks (default 1: k-NN features)")
    p.add_argument("--avgpool", action="store_true", help="append the average of the last block's patch tokens")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="inference precision (default fp32)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--fast-path-check", default="fallback", choices=["fallback", "strict", "off"],
                   help="bf16: check it against fp32 on the first batch; fallback (default) extracts in fp32 when "
                        "the check fails, strict fails instead, off skips the check")
    p.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"],
                   help="how the features are stored (default float32; float16 halves the bytes on disk and in "
                        "memory, scores move by under 0.1 point)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="extraction processes, one per GPU (default 1: in-process; >1: torchrun)")
    add_task_runner_option(p, "extraction's range tasks")
    p.add_argument("--parallelism", type=int, default=2,
                   help="worker processes of --task-runner processes / dask (default 2)")


@command("extract", "write a backbone's features of a shard set as Parquet (the dino-extract flow)", _configure_extract)
def run_extract(args: argparse.Namespace) -> int:
    from dino_model.storage import StorageError
    from tasks.validation import UserInputError, check_backbone_reference, check_extraction_request
    from tasks.validation.extraction_settings import ExtractionRunnerSettings, FeatureSettings
    from tasks.validation.task_runners import check_extraction_runner

    # The flow's own checks (check-extraction-input), here before Prefect starts; plus the model reference.
    for option, value in (("--batch-size", args.batch_size), ("--n-last-blocks", args.n_last_blocks),
                          ("--nproc-per-node", args.nproc_per_node)):
        if value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")
    check_extraction_runner(args.task_runner, args.parallelism, args.nproc_per_node, prefix="--")
    check_backbone_reference(args.model)
    found = check_extraction_request(args.data, args.classes_from, args.resize, args.crop, args.output, args.device)
    print_warnings("extract", found.warnings)
    if args.model.startswith("models:/"):
        use_registry(args.model)
    from flows.extract import dino_extract

    features = FeatureSettings(resize_size=args.resize, crop_size=args.crop, batch_size=args.batch_size,
                               n_last_blocks=args.n_last_blocks, avgpool=args.avgpool, precision=args.precision,
                               fast_path_check=args.fast_path_check, feature_dtype=args.feature_dtype)
    runner = ExtractionRunnerSettings(device=args.device, nproc_per_node=args.nproc_per_node,
                                      task_runner=args.task_runner, parallelism=args.parallelism)
    with flow_session(reported=(UserInputError, StorageError, FileNotFoundError), debug=args.debug):
        try:
            out = dino_extract(model=args.model, data=args.data, output=args.output, split=args.split,
                               classes_from=args.classes_from, features=features, runner=runner)
        except (StorageError, FileNotFoundError) as e:
            raise UsageError(str(e)) from e
    print(f"{out['num_rows']} x {out['dim']} {out['feature_kind']} features of split {out['split']!r} -> {out['uri']}"
          f" ({len(out['files'])} file(s), {out['precision']}; fast path: {out['fast_path']['verdict']})")
    return 0

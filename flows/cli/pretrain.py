"""``dino pretrain``: DINO pretraining with torchrun, tracked in MLflow (the ``dino-pretrain`` flow).

    dino pretrain s3://bucket/imagenette/train s3://bucket/checkpoints/run1 --preset small --set train.epochs=10
"""

from __future__ import annotations

import argparse
import os

from .common import UsageError, command, print_mlflow_hint, trainer_progress_bar, use_embedded_mlflow
from .prefect_session import flow_session


def _configure_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="shard set (folder or s3:// prefix with manifest.json) or ImageFolder")
    p.add_argument("checkpoints", metavar="CHECKPOINTS", help="folder or s3:// prefix for checkpoints and the export")
    p.add_argument("--preset", default="reference",
                   help="reference, boost, multicrop10, small, small-data (chosen by the data set's size; or a bucket "
                        "small-data-20k/-50k/-100k/-200k), resnet50 (comma-separated to chain)")
    p.add_argument("--val", metavar="SHARDS", help="labelled validation shard set: the teacher's k-NN on it during "
                                                  "training (the learning curve, MLflow metric monitor.knn20_top1)")
    p.add_argument("--config", help="YAML/JSON training config applied after the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes (one per GPU; default 1)")
    p.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    p.add_argument("--rdzv-endpoint", default="", help="HOST:PORT of the c10d rendezvous when --nnodes > 1")
    p.add_argument("--experiment", default="dino-pretrain", help="MLflow experiment (default dino-pretrain)")
    p.add_argument("--registered-model", default="dino-backbone", help="MLflow registered model name")
    p.add_argument("--resume", default="auto", choices=["auto", "never", "require"],
                   help="auto: resume when checkpoints exist (default); never / require: refuse otherwise")
    p.add_argument("--retries", type=int, default=2, help="relaunch a failed trainer (resuming) this many times")


@command("pretrain", "pretrain DINO with torchrun, tracked in MLflow (the dino-pretrain flow)", _configure_pretrain)
def run_pretrain(args: argparse.Namespace) -> int:
    from tasks.pretrain.trainer_process import LaunchSpec
    from tasks.validation import UserInputError, check_pretrain_request
    from tasks.validation.pretrain_settings import LaunchSettings, TrackingSettings
    from tasks.validation.training import PretrainRequest

    # Every check that needs no side effect (config, presets, overrides, launch, resume, the data's manifest and
    # shards): the flow's first task runs the same ones; here they fail before Prefect or MLflow start.
    if args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")
    request = PretrainRequest(args.data, args.checkpoints, args.preset, args.config, tuple(args.overrides),
                              args.resume, args.val)
    check_pretrain_request(request, LaunchSpec(args.nproc_per_node, args.nnodes, args.rdzv_endpoint))
    launch = LaunchSettings(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                            retries=args.retries)
    tracking = TrackingSettings(experiment=args.experiment, registered_model=args.registered_model)
    use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the progress bar is the display
    from flows.pretrain import dino_pretrain

    with flow_session(reported=(UserInputError,), debug=args.debug), trainer_progress_bar():
        out = dino_pretrain(data=request.data, checkpoint_uri=request.checkpoint_uri, preset=request.preset,
                            config_file=request.config_file, overrides=list(request.overrides),
                            resume=request.resume, val_data=request.val_data, launch=launch, tracking=tracking)
    print(f"registered {out['registered_model']} version {out['version']} (alias 'candidate'); "
          f"MLflow run {out['run_id']}; export {out['export_uri']}")
    print_mlflow_hint()
    return 0

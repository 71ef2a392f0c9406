"""``dino pipeline`` and ``dino demo``: the whole pipeline (shard → pretrain → evaluate) from the command line.

    dino pipeline /data/train /data/val ./run1 --preset small --set train.epochs=20
    dino pipeline /data/train /data/val s3://bucket/run1 --task-runner tcp://10.0.0.5:8786   # data stages on Dask
    dino demo                   # generated data, embedded MLflow (sqlite), in-process Prefect: no servers

Registered into :data:`flows.cli.common.COMMANDS` on import (``flows/cli/__init__.py`` imports this module).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    UsageError,
    add_task_runner_option,
    command,
    print_mlflow_hint,
    trainer_progress_bar,
    use_embedded_mlflow,
)
from .prefect_session import flow_session

if TYPE_CHECKING:
    from tasks.validation.pipeline import PipelineRequest

#: The demo's training recipe: the paper's method (multi-crop, centring + sharpening, EMA teacher, schedules) with
#: the small-data recipe (``small-data-20k``: K = 1,024, teacher temperature 0.02, EMA momentum 0.99; docs/small-data.md)
#: at a size a 2-core laptop trains in a few minutes: ViT-Tiny/16 on 64-px crops (2 global + 4 local), batches of
#: 16; the health monitor judges windows of 20 steps, and the learning curve is measured every 2 epochs.
DEMO_PRESET = "small-data-20k"
DEMO_OVERRIDES = [
    "model.arch=vit_tiny",
    "crops.global_size=64",
    "crops.local_size=32",
    "crops.n_local=4",
    "data.batch_size_per_gpu=16",
    "data.num_workers=0",
    "train.epochs=6",
    "optim.warmup_epochs=1",
    "optim.lr=0.002",
    "logging.log_every=2",
    "checkpoint.every_n_steps=0",
    "health.window_steps=20",
    "monitor.crop_size=64",
    "monitor.every_epochs=2",
]
#: The demo's generated data: 6 shape classes at 64 px, 30 training and 50 validation images per class (300 to
#: measure on, so one image is a third of a point), and two short videos with masks.
DEMO_DATA = {"classes": 6, "size": 64, "train_per_class": 30, "val_per_class": 50}


def _configure_pipeline(p: argparse.ArgumentParser) -> None:
    p.add_argument("train", metavar="TRAIN", help="training images (ImageFolder, ILSVRC layout or flat folder)")
    p.add_argument("val", metavar="VAL", help="labelled validation images with the same classes")
    p.add_argument("workspace", metavar="WORKSPACE", help="folder or s3:// prefix for shards, checkpoints, features")
    p.add_argument("--preset", default="reference", help="training preset(s), e.g. small or boost,small")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="training config override, e.g. --set train.epochs=10 (repeatable)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="training processes (one per GPU; default 1)")
    p.add_argument("--davis", help="DAVIS-2017 folder: also score attention maps and label propagation")
    p.add_argument("--registered-model", default="dino-backbone", help="MLflow registered model name")
    add_task_runner_option(p, "shard tasks and the evaluation's feature extraction")
    p.add_argument("--parallelism", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                   help="shard tasks at once, and the workers of processes / dask (default: CPU count, 2..8)")


@command("pipeline", "shard, pretrain and evaluate in one run (the dino-pipeline flow)", _configure_pipeline)
def run_pipeline(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before Prefect is imported: the bar is the display
    from tasks.validation.pipeline import PipelineRequest

    evaluation = _evaluation_settings(davis_root=args.davis, **_workspace_paths(args.workspace),
                                      evaluations=["knn", "linear_fast"] + (["attention", "davis"] if args.davis
                                                                            else []))
    request = PipelineRequest(args.train, args.val, args.workspace, args.preset, tuple(args.overrides),
                              args.shard_size, args.nproc_per_node, registered_model=args.registered_model,
                              evaluation=evaluation, task_runner=args.task_runner, parallelism=args.parallelism)
    _report(_run(request, debug=args.debug))
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default=".demo", help="where everything goes (default ./.demo)")
    p.add_argument("--epochs", type=int, default=6, help="training epochs (default 6: a few minutes on 2 cores)")


@command("demo", "run the whole pipeline on a small generated dataset (no servers, nothing downloaded)",
         _configure_demo)
def run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before Prefect is imported: the bar is the display
    from tasks.validation.pipeline import PipelineRequest
    from tasks.validation.training import PretrainRequest, load_training_config

    overrides = tuple(DEMO_OVERRIDES + [f"train.epochs={args.epochs}"])
    # e.g. --epochs 0, before any work
    load_training_config(PretrainRequest("data", "checkpoints", DEMO_PRESET, overrides=overrides))
    work = Path(args.workdir).resolve()
    if work.exists() and not work.is_dir():
        raise UsageError(f"--workdir {args.workdir} is a file: give a folder (created if missing)")
    from dino_model.data.synthetic import make_synthetic_imagefolder
    from dino_model.data.synthetic_video import make_synthetic_davis

    d = DEMO_DATA
    data = work / f"data-{d['classes']}x{d['train_per_class']}+{d['val_per_class']}-{d['size']}px"
    started = time.monotonic()
    print(f"dino demo: everything goes under {work}")
    if not (data / "val").is_dir():  # generated once; a re-run reuses it (and every stage skips finished work)
        print(f"1/4 generating a labelled shapes dataset ({d['classes']} classes, {d['size']} px: "
              f"{d['classes'] * d['train_per_class']} training and {d['classes'] * d['val_per_class']} validation "
              "images) and 2 short videos with masks")
        make_synthetic_imagefolder(data / "train", classes=d["classes"], per_class=d["train_per_class"],
                                   size=d["size"], seed=0)
        make_synthetic_davis(data / "davis", sequences=2, frames=8, seed=0)
        make_synthetic_imagefolder(data / "val", classes=d["classes"], per_class=d["val_per_class"], size=d["size"],
                                   seed=1)
    evaluation = _evaluation_settings(
        **_workspace_paths(str(work / "run")),
        evaluations=["knn", "linear_fast", "attention", "davis"],
        resize_size=None, crop_size=64, batch_size=64, knn_ks=[10, 20],
        davis_root=str(data / "davis"), davis_short_side=96, attention_size=96, attention_frame_step=1,
        experiment="dino-demo-evaluate",
    )
    request = PipelineRequest(str(data / "train"), str(data / "val"), str(work / "run"), DEMO_PRESET, overrides, 100,
                              1, "dino-demo", "dino-demo", evaluation)
    out = _run(request, debug=args.debug)
    _report(out)
    _report_learning(out["pretrain"]["run_id"])
    print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


def _workspace_paths(workspace: str) -> dict[str, str]:
    """Where ``dino-pipeline`` puts the shard sets and features under ``workspace``
    (:func:`tasks.validation.pipeline.workspace_layout`), a local workspace as an absolute path."""
    from tasks.validation.pipeline import workspace_layout

    layout = workspace_layout(workspace if "://" in workspace else os.path.abspath(workspace))
    return {"train_data": layout.train_shards, "val_data": layout.val_shards, "features_root": layout.features}


def _evaluation_settings(**fields):
    from pydantic import ValidationError

    from tasks.validation import EvaluationSettings
    from tasks.validation.evaluation_settings import describe_validation_error

    try:
        return EvaluationSettings(**fields)
    except ValidationError as e:
        raise UsageError(describe_validation_error(e)) from e


def _run(request: PipelineRequest, debug: bool = False) -> dict:
    """Check ``request`` (before Prefect or MLflow start), then run ``dino-pipeline`` in-process on it."""
    from dino_model.storage import StorageError
    from tasks.validation import UserInputError
    from tasks.validation.pipeline import check_pipeline_request

    # The flow's first task (check-pipeline-request), here before Prefect or MLflow start.
    check_pipeline_request(request)
    workspace = request.workspace
    use_embedded_mlflow(os.path.join(os.path.abspath(workspace) if "://" not in workspace else os.getcwd(),
                                     "mlflow"))
    from flows.pipeline import dino_pipeline

    print("2/4 sharding, 3/4 pretraining (progress below), 4/4 evaluating — this takes a few minutes")
    with flow_session(reported=(UserInputError, StorageError, ValueError), debug=debug), trainer_progress_bar():
        try:
            return dino_pipeline(**request.flow_parameters())
        except (StorageError, ValueError) as e:
            raise UsageError(str(e)) from e


def _report_learning(run_id: str) -> None:
    """What the training learnt: the learning curve's first point (the randomly initialised backbone) beside its
    last (the trained teacher), both on the same validation images and memory, the curve, and the health verdict."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "monitor.knn20_top1"))
    print()
    if len(curve) > 1 and curve[0][0] == 0:
        (_, random_init), (_, trained) = curve[0], curve[-1]
        gain = trained - random_init
        print(f"learning:      k-NN 20 top-1 on the validation set: trained {trained:.2f} %, randomly initialised "
              f"backbone {random_init:.2f} % ({gain:+.2f} points)")
        print("               curve: " + " · ".join(f"{v:.1f} % (step {s})" for s, v in curve))
        if gain < 10:
            print("               (not clearly better than a random backbone: DINO needs far more steps than this CPU "
                  "demo runs; see docs/training-health.md)")
    print(f"health:        {tags.get('health', 'not judged (too few steps after the warm-up)')}"
          + (f" — {tags['health.detail']}" if tags.get("health.detail") else ""))


def _report(out: dict) -> None:
    trained, evaluated = out["pretrain"], out["evaluation"]
    print()
    print(f"shards:        {out['train_shards']}  ({trained.get('samples', '?')} images), {out['val_shards']}")
    print(f"trained:       {trained['final_step']} steps; MLflow run {trained['run_id']}")
    print(f"registered:    models:/{trained['registered_model']}/{trained['version']} (alias 'candidate')")
    print(f"export:        {trained['export_uri']} (timm-loadable safetensors)")
    print()
    from dino_model.eval.score_names import ordered

    metrics = evaluated["metrics"]
    width = max(len(m) for m in metrics) if metrics else 6
    print(f"{'metric':<{width}}  value (%)")
    print(f"{'-' * width}  ------")
    for name in ordered(metrics):
        if name.startswith("davis_seq_"):
            continue
        note = "  (approximate: fast probe on cached features)" if name.startswith("linear_approx_") else ""
        print(f"{name:<{width}}  {metrics[name]:6.2f}{note}")
    c = evaluated["champion"]
    print(f"champion alias: {'moved to this version' if c['moved'] else 'unchanged'} ({c['reason']})")
    print_mlflow_hint()

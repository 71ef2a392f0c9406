"""The ``dino`` console command: runs the project's Prefect flows in-process (no server to start).

    dino shard ../shared/data/imagenette-128/train s3://bucket/imagenette/train --shard-size 500
    dino shard ILSVRC2012_img_val.tar /data/shards/val --labels LOC_val_solution.csv
    dino --help / dino shard --help

Each subcommand is one function registered with :func:`command`: ``configure(parser)`` adds its arguments and the
decorated ``run(args) -> int`` executes it. Add a subcommand by writing those two functions; :func:`main` needs no
change. Prefect and the flows are imported inside ``run`` so ``dino --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Command:
    """One ``dino`` subcommand."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: name -> subcommand, in the order they appear in ``dino --help``.
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args) -> int`` as ``dino <name>``."""

    def register(run: Callable[[argparse.Namespace], int]):
        if name in COMMANDS:
            raise ValueError(f"dino subcommand {name!r} registered twice")
        COMMANDS[name] = Command(help, configure, run)
        return run

    return register


class UsageError(Exception):
    """A bad command line or unusable input: printed as ``dino <cmd>: error: ...`` with exit status 2."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``"200MB"`` -> 200_000_000, ``"1GiB"`` -> 1_073_741_824, ``"4096"`` -> 4096."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 1GiB, 1048576)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown size unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


# -- dino shard ------------------------------------------------------------------------------------------------


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
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (default 1000; 0: no limit)")
    p.add_argument("--shard-bytes", type=parse_bytes, default=None, help="target input bytes per shard, e.g. 500MB")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality when re-encoding (default 95)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit in pixels")
    p.add_argument("--parallelism", type=int, default=max(2, min(8, os.cpu_count() or 2)),
                   help="shard tasks at once (default: CPU count, 2..8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("shard", "shard an image dataset into WebDataset tars + manifest (the dino-shard flow)", _configure_shard)
def run_shard(args: argparse.Namespace) -> int:
    # The progress bar is the CLI's display; Prefect's INFO lines would tear it (user settings still win).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from tqdm import tqdm

    from dino_model.data.shard_writer import ShardOptions, default_name, validate_request
    from dino_model.data.sources import SourceSpec
    from dino_model.storage import StorageError

    bar = None

    def on_progress(event: str, value: int) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if event == "total":
            bar = tqdm(total=value, unit="img", desc=f"dino shard {args.name or ''}".strip(), dynamic_ncols=True)
        elif bar is not None:
            bar.update(value)

    try:  # the same cheap checks the flow starts with, before paying for Prefect's start-up
        validate_request(
            SourceSpec(args.source, args.kind, args.labels, args.meta, args.classes),
            args.destination,
            ShardOptions(args.name or default_name(args.source), args.shard_size or None, args.shard_bytes,
                         args.seed, args.quality, args.max_pixels),
        )
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from e

    from flows.shard import dino_shard
    from tasks.shard import add_progress_listener, remove_progress_listener

    add_progress_listener(on_progress)
    try:
        summary = dino_shard(
            source=args.source, destination=args.destination, name=args.name, kind=args.kind, labels=args.labels,
            meta=args.meta, classes=args.classes, shard_size=args.shard_size or None, shard_bytes=args.shard_bytes,
            seed=args.seed, quality=args.quality, max_pixels=args.max_pixels, parallelism=args.parallelism,
        )
    except (ValueError, OSError, StorageError) as e:
        raise UsageError(str(e)) from e
    finally:
        remove_progress_listener(on_progress)
        if bar is not None:
            bar.close()
    s = asdict(summary)
    print(
        f"found {s['found']} = accepted {s['accepted']} + rejected {s['rejected']} (re-encoded {s['reencoded']}); "
        f"{s['shards']} shards ({s['written']} written, {s['skipped']} already there), {s['bytes'] / 1e6:.1f} MB\n"
        f"manifest: {s['manifest']}"
    )
    return 0


# -- dino pretrain ---------------------------------------------------------------------------------------------


def _configure_pretrain(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="shard set (folder or s3:// prefix with manifest.json) or ImageFolder")
    p.add_argument("checkpoints", metavar="CHECKPOINTS", help="folder or s3:// prefix for checkpoints and the export")
    p.add_argument("--preset", default="reference",
                   help="reference, boost, multicrop10, small, resnet50 (comma-separated to chain)")
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
    use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the progress bar is the display
    from flows.pretrain import dino_pretrain
    from tasks.pretrain import PreflightError

    with trainer_progress_bar():
        out = _pretrain(args, dino_pretrain, PreflightError)
    print(f"registered {out['registered_model']} version {out['version']} (alias 'candidate'); "
          f"MLflow run {out['run_id']}; export {out['export_uri']}")
    print_mlflow_hint()
    return 0


def _pretrain(args, dino_pretrain, PreflightError) -> dict:
    try:
        return dino_pretrain(
            data=args.data, checkpoint_uri=args.checkpoints, preset=args.preset, config_file=args.config,
            overrides=args.overrides, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
            rdzv_endpoint=args.rdzv_endpoint, experiment=args.experiment, registered_model=args.registered_model,
            resume=args.resume, train_retries=args.retries,
        )
    except PreflightError as e:
        raise UsageError(str(e)) from e


class trainer_progress_bar:
    """A tqdm bar over the trainer's steps, fed by its ``DINO_PROGRESS`` records while the flow runs."""

    def __enter__(self):
        from tasks.pretrain import trainer_progress

        self.bar = None
        trainer_progress.add(self.update)
        return self

    def update(self, record: dict) -> None:
        from tqdm import tqdm

        event = record.get("event")
        if event == "start":
            if self.bar is None:
                self.bar = tqdm(total=record.get("total_steps"), unit="step", desc="dino pretrain", dynamic_ncols=True)
            self.bar.n = record.get("step", 0)
            self.bar.refresh()
        elif self.bar is not None and event == "step":
            self.bar.n = record["step"]
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", epoch=record.get("epoch"),
                                 refresh=False)
            self.bar.refresh()
        elif self.bar is not None and event == "error":
            self.bar.write(f"trainer error: {record.get('message') or record}")

    def __exit__(self, *exc):
        from tasks.pretrain import trainer_progress

        trainer_progress.remove(self.update)
        if self.bar is not None:
            self.bar.close()


def use_embedded_mlflow(folder: str) -> None:
    """Without ``MLFLOW_TRACKING_URI``, track into an embedded sqlite store (and local artifacts) in ``folder``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    os.makedirs(folder, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.path.abspath(folder)}/mlflow.db"
    # Read by tasks.pretrain / tasks.evaluation when they create an experiment: keep artifacts beside the store.
    os.environ.setdefault("DINO_MLFLOW_ARTIFACT_ROOT", os.path.join(os.path.abspath(folder), "artifacts"))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def print_mlflow_hint() -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("sqlite:"):
        print(f"browse the runs: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    elif uri:
        print(f"browse the runs: {uri}")


# -- dino extract / evaluate / reevaluate ----------------------------------------------------------------------


def _size_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "0") else int(text)


def _configure_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="models:/NAME/VERSION, models:/NAME@ALIAS, a checkpoint or an export")
    p.add_argument("data", metavar="DATA", help="shard set (folder or s3:// prefix with manifest.json)")
    p.add_argument("output", metavar="OUTPUT", help="Parquet dataset root (folder or s3:// prefix)")
    p.add_argument("--split", default="train", help="split name: rows' split and the sub-folder (default train)")
    p.add_argument("--classes-from", metavar="TRAIN", help="training shard set whose class indices the labels use")
    p.add_argument("--resize", type=_size_or_none, default=256, help="short side before the crop (default 256; none)")
    p.add_argument("--crop", type=_size_or_none, default=224, help="centre-crop side (default 224; none)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--n-last-blocks", type=int, default=1, help="[CLS] of the last n blocks (default 1: k-NN features)")
    p.add_argument("--avgpool", action="store_true", help="append the average of the last block's patch tokens")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="inference precision (default fp32)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="extraction processes, one per GPU (default 1: in-process; >1: torchrun)")


@command("extract", "write a backbone's features of a shard set as Parquet (the dino-extract flow)", _configure_extract)
def run_extract(args: argparse.Namespace) -> int:
    if args.model.startswith("models:/"):
        use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    from flows.extract import dino_extract
    from dino_model.storage import StorageError
    from tasks.evaluation import EvaluationInputError, ModelVersionNotFound

    try:
        out = dino_extract(
            model=args.model, data=args.data, output=args.output, split=args.split, classes_from=args.classes_from,
            resize_size=args.resize, crop_size=args.crop, batch_size=args.batch_size,
            n_last_blocks=args.n_last_blocks, avgpool=args.avgpool, precision=args.precision, device=args.device,
            nproc_per_node=args.nproc_per_node,
        )
    except (EvaluationInputError, ModelVersionNotFound, StorageError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    print(f"{out['num_rows']} x {out['dim']} {out['feature_kind']} features of split {out['split']!r} -> {out['uri']}"
          f" ({len(out['files'])} file(s))")
    return 0


def _add_evaluation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation settings (tasks.evaluation.EvaluationSettings; any field also via --set)")
    g.add_argument("--train", dest="train_data", help="training shard set (k-NN memory bank, probe training)")
    g.add_argument("--val", dest="val_data", help="validation shard set")
    g.add_argument("--features", dest="features_root", help="Parquet features root, folder or s3:// (default "
                                                             "./dino-features)")
    g.add_argument("--davis", dest="davis_root", help="DAVIS-2017 folder (attention maps, label propagation)")
    g.add_argument("--eval", dest="evaluations", help="comma-separated: knn,linear_fast,linear,attention,davis "
                                                      "(default: knn,linear_fast with --train/--val; attention,davis "
                                                      "with --davis)")
    g.add_argument("--resize", dest="resize_size", type=_size_or_none, help="short side before the crop (256; none)")
    g.add_argument("--crop", dest="crop_size", type=int, help="centre-crop side (224)")
    g.add_argument("--batch-size", type=int, help="images per forward pass (64)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="inference precision (fp32)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    g.add_argument("--nproc-per-node", dest="nproc_per_node", type=int,
                   help="feature-extraction processes, one per GPU (1: in-process; >1: torchrun)")
    g.add_argument("--ks", dest="knn_ks", help="k-NN k values, comma-separated (10,20,100,200)")
    g.add_argument("--davis-sequences", help="comma-separated sequences (default: ImageSets/2017/val.txt)")
    g.add_argument("--davis-max-frames", type=int, help="first N frames per sequence (quick runs)")
    g.add_argument("--experiment", help="MLflow experiment of the evaluation runs (dino-evaluate)")
    g.add_argument("--champion-metric", help="metric deciding alias 'champion' (knn20_top1)")
    g.add_argument("--champion-policy", choices=["always", "if_better", "never"], help="(if_better)")
    g.add_argument("--lower-is-better", dest="higher_is_better", action="store_false", default=None,
                   help="the champion metric is better when lower")
    g.add_argument("--set", dest="settings_overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="any settings field, value as JSON when it parses, e.g. --set linear_epochs=10 (repeatable)")


_LIST_FIELDS = {"evaluations": str, "knn_ks": int, "davis_sequences": str}


def _evaluation_settings(args: argparse.Namespace):
    import json

    from pydantic import ValidationError

    from tasks.evaluation import EvaluationSettings

    fields = {}
    for name in EvaluationSettings.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        fields[name] = [_LIST_FIELDS[name](v.strip()) for v in value.split(",") if v.strip()] \
            if name in _LIST_FIELDS else value
    for item in args.settings_overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in EvaluationSettings.model_fields:
            raise UsageError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(EvaluationSettings.model_fields)}")
        try:
            fields[key] = json.loads(raw)
        except json.JSONDecodeError:
            fields[key] = raw
    try:
        return EvaluationSettings(**fields)
    except ValidationError as e:
        raise UsageError("; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
                                   for err in e.errors())) from e


def _print_scores(result: dict) -> None:
    print(f"{result['model_uri']}  (MLflow evaluation run {result['run_id']})")
    for fam, h in result["evaluation_sets"].items():
        print(f"  evaluation set {fam}: {h}  (version tags eval.{h}.<metric>)")
    width = max([len(m) for m in result["metrics"]] + [6])
    print(f"  {'metric':<{width}}  value")
    for metric, value in sorted(result["metrics"].items()):
        note = "  (approximate: cached features)" if metric.startswith("linear_approx_") else ""
        print(f"  {metric:<{width}}  {value:.4f}{note}")
    c = result["champion"]
    print(f"  champion: {'moved to v' + str(result['version']) if c['moved'] else 'unchanged'} ({c['reason']})")


@command("evaluate", "k-NN, linear probes, attention maps, DAVIS J&F of a registered version (dino-evaluate)",
         lambda p: (p.add_argument("model", metavar="MODEL", help="models:/NAME/VERSION or models:/NAME@ALIAS"),
                    _add_evaluation_options(p)))
def run_evaluate(args: argparse.Namespace) -> int:
    settings = _evaluation_settings(args)  # bad settings fail here, before Prefect starts
    use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    from flows.evaluate import dino_evaluate
    from dino_model.storage import StorageError
    from tasks.evaluation import EvaluationInputError, ModelVersionNotFound

    try:
        result = dino_evaluate(model=args.model, settings=settings)
    except (EvaluationInputError, ModelVersionNotFound, StorageError) as e:
        raise UsageError(str(e)) from e
    _print_scores(result)
    print_mlflow_hint()
    return 0


def _configure_reevaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("registered_model", metavar="NAME", nargs="?", default="dino-backbone",
                   help="MLflow registered model (default dino-backbone)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--missing", dest="missing_metric", default="knn20_top1", metavar="METRIC",
                       help="only versions without METRIC on this evaluation set (default knn20_top1)")
    which.add_argument("--all", dest="missing_metric", action="store_const", const=None, help="every version")
    p.add_argument("--versions", help="comma-separated version numbers to consider (default: all)")
    _add_evaluation_options(p)


@command("reevaluate", "evaluate the registered versions missing a score (dino-reevaluate)", _configure_reevaluate)
def run_reevaluate(args: argparse.Namespace) -> int:
    settings = _evaluation_settings(args)
    versions = [int(v) for v in args.versions.split(",")] if args.versions else None
    use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    from flows.evaluate import dino_reevaluate
    from dino_model.storage import StorageError
    from tasks.evaluation import EvaluationInputError, ModelVersionNotFound

    try:
        out = dino_reevaluate(registered_model=args.registered_model, settings=settings,
                              missing_metric=args.missing_metric, versions=versions)
    except (EvaluationInputError, ModelVersionNotFound, StorageError, ValueError) as e:
        raise UsageError(str(e)) from e
    if not out["evaluated"]:
        print(f"nothing to evaluate: every version of {args.registered_model} has "
              f"{out['missing_tag'] or 'been selected out'}")
    for _, result in sorted(out["evaluated"].items()):
        _print_scores(result)
    print_mlflow_hint()
    return 0


# -- entry point -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from flows import cli_pipeline  # noqa: F401 - registers `dino pipeline` and `dino demo`

    parser = argparse.ArgumentParser(prog="dino", description="DINO pretraining pipeline (Prefect flows, in-process)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in COMMANDS.items():
        cmd.configure(sub.add_parser(name, help=cmd.help, description=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Local runs stay off the internet: no Prefect server analytics unless the user asks for them.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The in-process (ephemeral) Prefect server can take longer than Prefect's 20 s default to start on a busy
    # laptop or CI runner.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except UsageError as e:
        print(f"dino {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dino {args.command}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m flows.cli`: run the imported module's main, whose registry the command modules fill.
    from flows.cli import main as _main

    sys.exit(_main())

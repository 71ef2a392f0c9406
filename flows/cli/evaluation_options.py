"""The evaluation options that ``dino evaluate`` and ``dino reevaluate`` share: the flags of
:class:`tasks.evaluation.EvaluationSettings` (plus ``--set FIELD=VALUE``), their parsing into settings, and the
printed score table."""

from __future__ import annotations

import argparse

from .common import UsageError, size_or_none, task_runner_choice


def add_evaluation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation settings (tasks.evaluation.EvaluationSettings; any field also via --set)")
    g.add_argument("--train", dest="train_data", help="training shard set (k-NN memory bank, probe training)")
    g.add_argument("--val", dest="val_data", help="validation shard set")
    g.add_argument("--features", dest="features_root", help="Parquet features root, folder or s3:// (default "
                                                             "./dino-features)")
    g.add_argument("--davis", dest="davis_root", help="DAVIS-2017 folder (attention maps, label propagation)")
    g.add_argument("--eval", dest="evaluations", help="comma-separated: knn,linear_fast,linear,attention,davis "
                                                      "(default: knn,linear_fast with --train/--val; attention,davis "
                                                      "with --davis)")
    # default=SUPPRESS: an absent option keeps the settings' default, while "none" sets the field to None.
    g.add_argument("--resize", dest="resize_size", type=size_or_none, default=argparse.SUPPRESS,
                   help="short side before the crop (256; none)")
    g.add_argument("--crop", dest="crop_size", type=size_or_none, default=argparse.SUPPRESS,
                   help="centre-crop side (224; none: the resized image whole, k-NN and linear_fast only)")
    g.add_argument("--batch-size", type=int, help="images per forward pass (64)")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="inference precision (fp32)")
    g.add_argument("--feature-dtype", choices=["float32", "float16"],
                   help="how the cached features are stored (float32; float16 halves their bytes)")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    g.add_argument("--nproc-per-node", dest="nproc_per_node", type=int,
                   help="feature-extraction processes, one per GPU (1: in-process; >1: torchrun)")
    g.add_argument("--task-runner", type=task_runner_choice, metavar="RUNNER",
                   help="where feature extraction runs: threads (default: in this process), or one task per sample "
                        "range on processes, dask (a local Dask cluster) or tcp://HOST:PORT (a Dask scheduler)")
    g.add_argument("--parallelism", type=int, help="worker processes of --task-runner processes / dask (2)")
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
_NONE_ALLOWED = ("resize_size", "crop_size")


def evaluation_settings(args: argparse.Namespace):
    """The options as :class:`~tasks.validation.EvaluationSettings` (validated; no Prefect imported)."""
    import json

    from pydantic import ValidationError

    from tasks.validation import EvaluationSettings
    from tasks.validation.evaluation_settings import describe_validation_error

    fields = {}
    for name in EvaluationSettings.model_fields:
        if name in _NONE_ALLOWED and hasattr(args, name):
            fields[name] = getattr(args, name)
            continue
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in _LIST_FIELDS:
            try:
                fields[name] = [_LIST_FIELDS[name](v.strip()) for v in value.split(",") if v.strip()]
            except ValueError as e:
                raise UsageError(f"{name}: expected comma-separated {_LIST_FIELDS[name].__name__} values, got "
                                 f"{value!r}") from e
        else:
            fields[name] = value
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
        raise UsageError(describe_validation_error(e)) from e


def print_scores(result: dict) -> None:
    from dino_model.eval.score_names import ordered

    print(f"{result['model_uri']}  (MLflow evaluation run {result['run_id']})")
    names = result.get("evaluation_set_names") or {}
    for fam, h in result["evaluation_sets"].items():
        name = names.get(fam, h)
        print(f"  evaluation set {name} ({fam}, hash {h}): version tags eval.{name}.<metric>")
    width = max([len(m) for m in result["metrics"]] + [6])
    print(f"  {'metric':<{width}}  value (%)")
    for metric in ordered(result["metrics"]):
        value = result["metrics"][metric]
        note = "  (approximate: cached features)" if metric.startswith("linear_approx_") else ""
        print(f"  {metric:<{width}}  {value:.2f}{note}")
    c = result["champion"]
    print(f"  champion: {'moved to v' + str(result['version']) if c['moved'] else 'unchanged'} ({c['reason']})")
    if result.get("report"):
        print(f"  report: {result['report']} (artifact of the MLflow evaluation run)")

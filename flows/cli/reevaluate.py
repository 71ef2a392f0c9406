"""``dino reevaluate``: evaluate the registered versions that lack a score on the evaluation set (the
``dino-reevaluate`` flow).

    dino reevaluate dino-backbone --train s3://b/imagenette/train --val s3://b/imagenette/val --missing knn20_top1
"""

from __future__ import annotations

import argparse

from .common import UsageError, command, print_mlflow_hint, print_warnings, use_registry
from .evaluation_options import add_evaluation_options, evaluation_settings, print_scores
from .prefect_session import flow_session


def _configure_reevaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("registered_model", metavar="NAME", nargs="?", default="dino-backbone",
                   help="MLflow registered model (default dino-backbone)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--missing", dest="missing_metric", default="knn20_top1", metavar="METRIC",
                       help="only versions without METRIC on this evaluation set (default knn20_top1)")
    which.add_argument("--all", dest="missing_metric", action="store_const", const=None, help="every version")
    p.add_argument("--versions", help="comma-separated version numbers to consider (default: all)")
    add_evaluation_options(p)


@command("reevaluate", "evaluate the registered versions missing a score (dino-reevaluate)", _configure_reevaluate)
def run_reevaluate(args: argparse.Namespace) -> int:
    from dino_model.storage import StorageError
    from tasks.validation import UserInputError, check_evaluation_request, check_model_name
    from tasks.validation.evaluation_settings import metric_family

    # The flow's own checks, here before Prefect starts.
    settings = evaluation_settings(args)
    check_model_name(args.registered_model)
    try:
        versions = [int(v) for v in args.versions.split(",")] if args.versions else None
    except ValueError as e:
        raise UsageError(f"--versions: expected comma-separated version numbers, got {args.versions!r}") from e
    if args.missing_metric is not None and metric_family(args.missing_metric, settings) is None:
        raise UsageError(f"--missing {args.missing_metric}: not a metric of the evaluations {settings.selected()} "
                         "(e.g. knn20_top1, linear_approx_best_top1, davis_jf_mean), or use --all")
    print_warnings("reevaluate", check_evaluation_request(settings).warnings)
    use_registry(f"registered model {args.registered_model!r}", name=args.registered_model, versions=versions)
    from flows.evaluate import dino_reevaluate

    with flow_session(reported=(UserInputError, StorageError), debug=args.debug):
        try:
            out = dino_reevaluate(registered_model=args.registered_model, settings=settings,
                                  missing_metric=args.missing_metric, versions=versions)
        except StorageError as e:
            raise UsageError(str(e)) from e
    if not out["evaluated"]:
        print(f"nothing to evaluate: every version of {args.registered_model} has "
              f"{out['missing_tag'] or 'been selected out'}")
    for _, result in sorted(out["evaluated"].items()):
        print_scores(result)
    print_mlflow_hint()
    return 0

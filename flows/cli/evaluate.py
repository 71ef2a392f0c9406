"""``dino evaluate``: k-NN, linear probes, attention maps and DAVIS J&F of one registered version (the
``dino-evaluate`` flow).

    dino evaluate models:/dino-backbone@candidate --train s3://b/imagenette/train --val s3://b/imagenette/val
    dino register ./run1/checkpoints/export --name my-vit && dino evaluate models:/my-vit@candidate --train ...
"""

from __future__ import annotations

import argparse

from .common import UsageError, command, print_mlflow_hint, print_warnings, use_registry
from .evaluation_options import add_evaluation_options, evaluation_settings, print_scores
from .prefect_session import flow_session


@command("evaluate", "k-NN, linear probes, attention maps, DAVIS J&F of a registered version (dino-evaluate)",
         lambda p: (p.add_argument("model", metavar="MODEL",
                                   help="models:/NAME/VERSION or models:/NAME@ALIAS (a local export or checkpoint: "
                                        "dino register it first)"),
                    add_evaluation_options(p)))
def run_evaluate(args: argparse.Namespace) -> int:
    from dino_model.storage import StorageError
    from tasks.validation import UserInputError, check_evaluation_request, parse_model_uri

    # The flow's own checks (check-evaluation-inputs, the model version in the registry), before Prefect starts.
    settings = evaluation_settings(args)
    parse_model_uri(args.model)
    print_warnings("evaluate", check_evaluation_request(settings).warnings)
    use_registry(args.model)
    from flows.evaluate import dino_evaluate

    with flow_session(reported=(UserInputError, StorageError), debug=args.debug):
        try:
            result = dino_evaluate(model=args.model, settings=settings)
        except StorageError as e:
            raise UsageError(str(e)) from e
    print_scores(result)
    print_mlflow_hint()
    return 0

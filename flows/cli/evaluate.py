"""``dino evaluate``: k-NN, linear probes, attention maps and DAVIS J&F of one registered version (the
``dino-evaluate`` flow).

    dino evaluate models:/dino-backbone@candidate --train s3://b/imagenette/train --val s3://b/imagenette/val
"""

from __future__ import annotations

import argparse
import os

from .common import UsageError, command, print_mlflow_hint, use_embedded_mlflow
from .evaluation_options import add_evaluation_options, evaluation_settings, print_scores


@command("evaluate", "k-NN, linear probes, attention maps, DAVIS J&F of a registered version (dino-evaluate)",
         lambda p: (p.add_argument("model", metavar="MODEL", help="models:/NAME/VERSION or models:/NAME@ALIAS"),
                    add_evaluation_options(p)))
def run_evaluate(args: argparse.Namespace) -> int:
    settings = evaluation_settings(args)  # bad settings fail here, before Prefect starts
    use_embedded_mlflow(os.path.join(os.getcwd(), "mlruns-dino"))
    from flows.evaluate import dino_evaluate
    from dino_model.storage import StorageError
    from tasks.evaluation import EvaluationInputError, ModelVersionNotFound

    try:
        result = dino_evaluate(model=args.model, settings=settings)
    except (EvaluationInputError, ModelVersionNotFound, StorageError) as e:
        raise UsageError(str(e)) from e
    print_scores(result)
    print_mlflow_hint()
    return 0

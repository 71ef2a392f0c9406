"""MLflow helpers shared by the tasks (no Prefect here).

``DINO_MLFLOW_ARTIFACT_ROOT``: where new experiments keep their artifacts when the tracking store has no artifact
server (the embedded sqlite store of ``dino pretrain`` / ``dino demo``); unset, MLflow's default applies (a
tracking server's ``--artifacts-destination``).

Every experiment this project creates is marked as a model-training experiment (tag ``mlflow.experimentKind`` =
``custom_model_development``, what the UI's own experiment-type selector writes). MLflow 3.17's UI decides the
view from its "GenAI / Model training" switch (the ``workflowType`` URL parameter, else the browser's last choice,
GenAI at first), so every UI link the pipeline writes carries ``?workflowType=machine_learning``
(:func:`mlflow_ui_link`): a link from an artifact, a model card or the CLI opens the runs, not traces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Experiment tag MLflow reads for the experiment's kind, and the value of a model-training experiment.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
#: The query that opens MLflow 3.17's UI in its model-training view.
UI_VIEW_QUERY = "workflowType=machine_learning"


def get_or_create_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created (with the configured artifact root) if missing, and marked as a
    model-training experiment (an existing one without a kind is marked too; one a person set is left alone)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return exp.experiment_id
    root = os.environ.get("DINO_MLFLOW_ARTIFACT_ROOT")
    location = (Path(root) / name).resolve().as_uri() if root and "://" not in root else (
        f"{root.rstrip('/')}/{name}" if root else None
    )
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})


def mlflow_ui_link(path: str, tracking_uri: str | None = None) -> str | None:
    """The MLflow UI address of ``path`` (``experiments/1/runs/<id>``, ``models/<name>/versions/3``, ...) in its
    model-training view, when the tracking URI is a server (``http(s)://``); None for a local store (no UI
    address: ``mlflow ui`` serves it on a port of the reader's choosing)."""
    import mlflow

    base = (tracking_uri or mlflow.get_tracking_uri() or "").rstrip("/")
    if not base.startswith(("http://", "https://")):
        return None
    return f"{base}/#/{path.lstrip('/')}?{UI_VIEW_QUERY}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 5e-4}}`` -> ``{"optim.lr": "0.0005"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out

"""MLflow helpers shared by the tasks (no Prefect here).

``DINO_MLFLOW_ARTIFACT_ROOT``: where new experiments keep their artifacts when the tracking store has no artifact
server (the embedded sqlite store of ``dino pretrain`` / ``dino demo``); unset, MLflow's default applies (a
tracking server's ``--artifacts-destination``).
"""

from __future__ import annotations

import os
from pathlib import Path


def get_or_create_experiment(client, name: str) -> str:
    """The id of experiment ``name``, created (with the configured artifact root) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = os.environ.get("DINO_MLFLOW_ARTIFACT_ROOT")
    location = (Path(root) / name).resolve().as_uri() if root and "://" not in root else (
        f"{root.rstrip('/')}/{name}" if root else None
    )
    return client.create_experiment(name, artifact_location=location)

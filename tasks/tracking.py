"""MLflow helpers shared by the tasks (no Prefect here).

``DINO_MLFLOW_ARTIFACT_ROOT``: where new experiments keep their artifacts when the tracking store has no artifact
server (the embedded sqlite store of ``dino pretrain`` / ``dino demo``); unset, MLflow's default applies (a
tracking server's ``--artifacts-destination``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 5e-4}}`` -> ``{"optim.lr": "0.0005"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out

"""Registering an exported teacher backbone in MLflow: logged as a pyfunc model of a run
(:func:`dino_model.mlflow_model.log_backbone_model`), registered as a new version with tags, and pointed at by an
alias. One implementation for the ``register-backbone`` task of ``dino-pretrain`` and for ``dino register`` (no
Prefect here)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def register_export(run_id: str, export_uri: str, registered_model: str, tags: dict[str, str],
                    alias: str = "candidate") -> int:
    """Log the export at ``export_uri`` (folder or ``s3://`` prefix with ``backbone.safetensors`` +
    ``config.json``) as the model ``backbone`` of the MLflow run ``run_id`` (left RUNNING: its owner ends it),
    register it as a new version of ``registered_model`` with ``tags``, and point ``alias`` at it. Returns the
    version number."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dino_model.export import CONFIG_NAME, WEIGHTS_NAME, load_export_config
    from dino_model.mlflow_model import log_backbone_model
    from dino_model.storage import open_store

    export_cfg = load_export_config(export_uri)
    store = open_store(export_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for key in (WEIGHTS_NAME, CONFIG_NAME):
            Path(tmp, key).write_bytes(store.get_bytes(key))
        with mlflow.start_run(run_id=run_id):
            info = log_backbone_model(tmp, name="backbone", embed_dim=int(export_cfg["embed_dim"]),
                                      metadata={"arch": export_cfg["arch"], "patch_size": export_cfg["patch_size"]})
            # start_run/end_run would mark the run FINISHED; the run's owner sets the final status itself.
            mlflow.end_run(status="RUNNING")
    mv = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    MlflowClient().set_registered_model_alias(registered_model, alias, mv.version)
    return int(mv.version)

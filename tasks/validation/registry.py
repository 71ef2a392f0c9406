"""Registered models and versions, looked up in the MLflow registry: a read, so the ``dino`` command runs it
before Prefect starts (a version that does not exist fails in seconds), and the flows' registry tasks
(:mod:`tasks.evaluation.registry`) use the same functions. MLflow is imported only when a lookup runs.

    version = find_model_version("models:/dino-backbone@champion")   # ModelVersionNotFound names what is missing
    require_registered_model("dino-backbone", versions=[1, 3])
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ModelVersionNotFound, UserInputError
from .models import parse_model_uri

#: The registry the ``dino`` command uses without ``MLFLOW_TRACKING_URI``, relative to its working folder.
EMBEDDED_REGISTRY = Path("mlruns-dino") / "mlflow.db"


def check_registry_available(reference: str, cwd: str | None = None) -> None:
    """There is a registry to look ``reference`` up in: ``MLFLOW_TRACKING_URI``'s server answers its health check,
    or, without it, the command's embedded registry exists in ``cwd``. Creates nothing."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        db = Path(cwd or os.getcwd()) / EMBEDDED_REGISTRY
        if not db.is_file():
            raise ModelVersionNotFound(
                f"{reference}: no model registry here ({db} does not exist; `dino pretrain` and `dino register` "
                "write it in their working folder): run from that folder, or set MLFLOW_TRACKING_URI to your "
                "tracking server (`dino pipeline` / `dino demo` keep theirs in WORKSPACE/mlflow/mlflow.db: "
                "MLFLOW_TRACKING_URI=sqlite:///<absolute path of that file>)")
        return
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
        except (urllib.error.URLError, OSError) as e:
            raise UserInputError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable "
                                 f"({getattr(e, 'reason', e)}): start it, or fix MLFLOW_TRACKING_URI") from e


def find_model_version(model: str):
    """The ``mlflow.entities.model_registry.ModelVersion`` that ``model`` (``models:/NAME/VERSION`` or
    ``models:/NAME@ALIAS``) names now. Raises :class:`ModelVersionNotFound` naming the model, version or alias."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, version, alias = parse_model_uri(model)
    client = MlflowClient()
    try:
        return client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        what = f"version {version}" if version else f"alias {alias!r}"
        try:
            require_registered_model(name, client=client)
        except ModelVersionNotFound as missing:
            raise ModelVersionNotFound(f"{missing} (asked for {model})") from e
        raise ModelVersionNotFound(f"registered model {name!r} has no {what} (asked for {model})") from e


def require_registered_model(name: str, versions: list[int] | None = None, client=None) -> list:
    """Every version (``ModelVersion``) of the registered model ``name``; raises :class:`ModelVersionNotFound`
    when the model does not exist or lacks one of ``versions``."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        raise ModelVersionNotFound(f"registered model {name!r} does not exist") from e
    found = client.search_model_versions(f"name = '{name}'")
    unknown = sorted(set(versions or ()) - {int(mv.version) for mv in found})
    if unknown:
        raise ModelVersionNotFound(f"registered model {name!r} has no version(s) {unknown}")
    return found

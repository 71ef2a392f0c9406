"""The first two tasks of ``dino-pretrain``: the request resolved (``resolve-training-config``: every check that
needs no side effect, the same ones ``dino pretrain`` runs before Prefect starts) and the pre-flight checks that
need this worker or a write (``preflight``: MLflow reachable, the checkpoint URI writable, what the launcher needs).
"""

from __future__ import annotations

import urllib.request
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dino_model.checkpoint import list_checkpoints
from dino_model.storage import StorageError, open_store
from tasks.validation import PreflightError, check_pretrain_request, problems_message
from tasks.validation.training import PretrainRequest, ResolvedTraining

from .launchers import Launcher
from .trainer_process import LaunchSpec


@task(name="resolve-training-config", cache_policy=NO_CACHE)
def resolve_training_config(request: PretrainRequest, launch: LaunchSpec) -> ResolvedTraining:
    """Preset, then the config file, then the overrides, then ``data`` and ``checkpoint_uri``: the resolved,
    validated training config (as a plain dict: what is logged to MLflow and saved in every checkpoint) and what
    the data check learnt.

    The flow's first task: it runs every check that needs no side effect (config, launch, resume policy, the
    data's manifest and shards), the same ones ``dino pretrain`` runs before starting Prefect
    (:func:`tasks.validation.check_pretrain_request`), so a bad request fails here with the same message."""
    return check_pretrain_request(request, launch)


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(resolved: ResolvedTraining, launcher: Launcher) -> dict[str, Any]:
    """Check, before any GPU time is spent, what the first task could not: MLflow reachable, the checkpoint URI
    writable (a probe write) and what ``launcher`` needs on this worker (GPUs; for Kubernetes kubectl and
    addresses the pods reach). Raises :class:`PreflightError` listing every failure. Returns the facts the flow
    tags the run with (dataset hash, sample count, checkpoints already there)."""
    import mlflow

    logger = get_run_logger()
    facts = dict(resolved.facts)
    problems = _check_mlflow()
    problems += _check_checkpoints(resolved.cfg.checkpoint.uri, facts)
    problems += launcher.problems(resolved.cfg, mlflow.get_tracking_uri())
    if problems:
        raise PreflightError(problems_message("pre-flight failed", problems))
    logger.info("pre-flight ok: %s", ", ".join(f"{k}={v}" for k, v in facts.items()))
    return facts


def _check_mlflow() -> list[str]:
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10)
        except Exception as e:  # noqa: BLE001
            return [f"mlflow: tracking server {uri} is not reachable ({type(e).__name__}: {e})"]
    try:
        mlflow.tracking.MlflowClient().search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001
        return [f"mlflow: cannot use tracking URI {uri}: {type(e).__name__}: {e}"]
    return []


def _check_checkpoints(uri: str, facts: dict) -> list[str]:
    """The checkpoint URI takes a write (a probe); the resume policy was checked with the other side-effect-free
    checks (:func:`tasks.validation.training.resume_problems`)."""
    try:
        open_store(uri).check_writable()
        facts["existing_checkpoints"] = len(list_checkpoints(uri))
    except (StorageError, ValueError) as e:
        return [f"checkpoint: {e}"]
    return []

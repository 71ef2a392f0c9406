"""Prefect tasks of the ``dino-pretrain`` flow: resolve the config, pre-flight checks, the MLflow run, the trainer
launch, the run's summary, and the model registration. Each task does one thing with one side effect; clients
(boto3, MLflow) are created inside the task that uses them. No task caches its inputs: every one has side effects
or reads state that changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from dino_model.checkpoint import list_checkpoints
from dino_model.config import ConfigError, DinoConfig, load_config
from dino_model.data.manifest import MANIFEST_NAME, load_manifest
from dino_model.storage import StorageError, open_store

from .kubernetes_job import KubernetesSettings
from .kubernetes_job import preflight_problems as kubernetes_preflight
from .listeners import Listeners
from .tracking import flatten, get_or_create_experiment
from .trainer_process import LaunchSpec, run_trainer, torchrun_command, trainer_config

#: Tag on the MLflow run that ties it to the Prefect flow run, so a retried flow finds and resumes the same run.
FLOW_RUN_TAG = "prefect.flow_run_id"
RESUME_POLICIES = ("auto", "never", "require")

#: In-process followers of the trainer's progress records (the ``dino pretrain`` progress bar): ``fn(record)``.
trainer_progress = Listeners()


class PreflightError(RuntimeError):
    """One or more pre-flight checks failed; the message lists each failure."""


# ------------------------------------------------------------------------------------------------------------------
# config and pre-flight
# ------------------------------------------------------------------------------------------------------------------


@task(name="resolve-training-config", cache_policy=NO_CACHE)
def resolve_training_config(
    data: str,
    checkpoint_uri: str,
    preset: str = "reference",
    config_file: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Preset, then the config file, then the overrides, then ``data`` and ``checkpoint_uri``: the resolved,
    validated training config as a plain dict (what is logged to MLflow and saved in every checkpoint)."""
    overrides = list(overrides or [])
    overrides += [f"data.source={json.dumps(data)}", f"checkpoint.uri={json.dumps(checkpoint_uri)}"]
    try:
        return load_config(config_file, overrides=overrides, preset=preset or None).to_dict()
    except ConfigError as e:
        raise PreflightError(f"invalid training config: {e}") from e


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(config: dict[str, Any], launch: LaunchSpec, resume: str = "auto",
              kubernetes: KubernetesSettings | None = None) -> dict[str, Any]:
    """Check, before any GPU time is spent, that the config is valid, the data readable and consistent, MLflow
    reachable and the checkpoint URI writable. Raises :class:`PreflightError` listing every failure. Returns facts
    the flow tags the run with (dataset hash, sample count). With ``kubernetes``, the pods' GPUs replace this
    worker's in the checks, and the launch's own requirements are checked (kubectl, addresses the pods reach)."""
    logger = get_run_logger()
    problems: list[str] = []
    facts: dict[str, Any] = {}

    try:
        cfg = DinoConfig.from_dict(config)
    except ConfigError as e:
        raise PreflightError(f"pre-flight failed:\n - config: {e}") from e
    try:
        launch.validate()
    except ValueError as e:
        problems.append(f"launch: {e}")
    if resume not in RESUME_POLICIES:
        problems.append(f"resume must be one of {RESUME_POLICIES}, got {resume!r}")

    problems += _check_data(cfg, launch, facts)
    problems += _check_mlflow()
    problems += _check_checkpoints(cfg.checkpoint.uri, resume, facts)
    if kubernetes is None:
        problems += _check_devices(cfg, launch)
    else:
        import mlflow

        problems += kubernetes_preflight(kubernetes, launch, cfg.data.source, cfg.checkpoint.uri,
                                         mlflow.get_tracking_uri())
    if problems:
        raise PreflightError("pre-flight failed:\n" + "\n".join(f" - {p}" for p in problems))
    logger.info("pre-flight ok: %s", ", ".join(f"{k}={v}" for k, v in facts.items()))
    return facts


def _check_data(cfg: DinoConfig, launch: LaunchSpec, facts: dict) -> list[str]:
    source = cfg.data.source
    if not source:
        return ["data: no data source given"]
    try:
        store = open_store(source)
    except ValueError as e:
        return [f"data: {e}"]
    try:
        has_manifest = store.exists(MANIFEST_NAME)
    except StorageError as e:
        return [f"data: {source} is not readable: {e}"]
    if not has_manifest:
        root = Path(source)
        if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
            facts["data_kind"] = "imagefolder"
            return []
        return [f"data: {source} holds neither {MANIFEST_NAME} (a shard set) nor class folders (an ImageFolder)"]
    try:
        manifest = load_manifest(store)
    except (ValueError, StorageError) as e:
        return [f"data: {e}"]
    problems = []
    sizes = {o.key: o.size for o in store.list(manifest.name)}
    for shard in manifest.shards:
        if shard.name not in sizes:
            problems.append(f"data: shard {store.url(shard.name)} listed in the manifest is missing")
        elif sizes[shard.name] != shard.bytes:
            problems.append(
                f"data: shard {store.url(shard.name)} has {sizes[shard.name]} bytes, the manifest says {shard.bytes}"
            )
    readers = launch.nproc_per_node * launch.nnodes * max(1, cfg.data.num_workers)
    if len(manifest.shards) < readers and not cfg.data.resampled:
        problems.append(
            f"data: {len(manifest.shards)} shards cannot feed {readers} readers (ranks x data.num_workers); "
            "write smaller shards or lower data.num_workers"
        )
    facts.update(data_kind="shards", dataset_hash=manifest.digest(), samples=manifest.num_samples,
                 shards=len(manifest.shards))
    return problems


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


def _check_checkpoints(uri: str, resume: str, facts: dict) -> list[str]:
    try:
        open_store(uri).check_writable()
        existing = list_checkpoints(uri)
    except (StorageError, ValueError) as e:
        return [f"checkpoint: {e}"]
    facts["existing_checkpoints"] = len(existing)
    if resume == "never" and existing:
        return [f"checkpoint: resume='never' but {uri} already holds {len(existing)} checkpoints; use a new URI"]
    if resume == "require" and not existing:
        return [f"checkpoint: resume='require' but {uri} holds no checkpoint"]
    return []


def _check_devices(cfg: DinoConfig, launch: LaunchSpec) -> list[str]:
    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        return ["device: train.device is 'cuda' but this worker has no CUDA GPU"]
    if torch.cuda.is_available() and cfg.train.device != "cpu" and launch.nproc_per_node > torch.cuda.device_count():
        return [f"device: nproc_per_node={launch.nproc_per_node} but this worker has {torch.cuda.device_count()} GPUs"]
    return []


# ------------------------------------------------------------------------------------------------------------------
# MLflow run
# ------------------------------------------------------------------------------------------------------------------


def git_commit() -> str:
    """The project's git commit, or ``unknown`` outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


@task(name="open-mlflow-run", cache_policy=NO_CACHE)
def open_mlflow_run(experiment: str, config: dict[str, Any], flow_run_id: str, run_name: str | None = None,
                    tags: dict[str, str] | None = None) -> str:
    """The MLflow run of this flow run: found by its tag when the flow is retried (same run, no duplicate), else
    created with the resolved config as params and the dataset hash and git commit as tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logger = get_run_logger()
    client = MlflowClient()
    exp_id = get_or_create_experiment(client, experiment)
    found = client.search_runs([exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logger.info("resuming MLflow run %s", run_id)
        return run_id
    all_tags = {FLOW_RUN_TAG: flow_run_id, "git_commit": git_commit(), **(tags or {})}
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limit
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        Path(path).write_text(json.dumps(config, indent=2))
        client.log_artifact(run.info.run_id, path)
    logger.info("MLflow run %s in experiment %r (%s)", run.info.run_id, experiment, mlflow.get_tracking_uri())
    return run.info.run_id


# ------------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------------


def progress_reporter(logger) -> tuple[Any, Callable[[dict], None]]:
    """A progress artifact and the callback that feeds it from the trainer's progress records (at most every 2 s),
    logs the trainer's milestones and forwards every record to :data:`trainer_progress`. Used by both launchers."""
    progress_id = create_progress_artifact(0.0, description="DINO pretraining: steps done")
    last_update = [0.0]

    def on_progress(record: dict) -> None:
        trainer_progress.emit(record)
        event = record.get("event")
        if event == "step" and record.get("total_steps"):
            if time.monotonic() - last_update[0] > 2.0:
                last_update[0] = time.monotonic()
                update_progress_artifact(progress_id, 100.0 * record["step"] / record["total_steps"])
        elif event in ("start", "fast_path", "checkpoint", "epoch", "end", "error"):
            logger.info("trainer %s: %s", event,
                        {k: v for k, v in record.items() if k not in ("event", "time", "config", "fast_path")})
        for part, verdict in _fast_path_records(record).items():
            log = logger.warning if verdict["status"] == "fallback" else logger.info
            log("fast path %s: %s (%s)", part, verdict["verdict"], verdict["path"])

    return progress_id, on_progress


def _fast_path_records(record: dict) -> dict[str, dict]:
    """The fast-path verdicts a progress record carries (``start`` / ``end`` / ``error`` hold them under
    ``fast_path``; a ``fast_path`` event is made of them)."""
    if record.get("event") == "fast_path":
        return {k: v for k, v in record.items() if isinstance(v, dict) and "verdict" in v}
    if record.get("event") in ("start", "error"):
        return dict(record.get("fast_path") or {})
    return {}


@task(name="train", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def train(config: dict[str, Any], run_id: str, launch: LaunchSpec) -> dict[str, Any]:
    """Run ``torchrun -m dino_model.train`` on this worker until it finishes. A retry resumes from the latest
    checkpoint (the trainer does that by itself) and logs into the same MLflow run, skipping steps it already has.
    """
    import mlflow

    logger = get_run_logger()
    config = trainer_config(config, run_id)
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_RUN_ID": run_id, **launch.extra_env}
    progress_id, on_progress = progress_reporter(logger)
    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "config.json")
        Path(config_path).write_text(json.dumps(config))
        cmd = torchrun_command(launch, config_path)
        logger.info("launching: %s", " ".join(cmd))
        end = run_trainer(cmd, env, on_line=logger.info, on_progress=on_progress)
    update_progress_artifact(progress_id, 100.0)
    return end or {}


# ------------------------------------------------------------------------------------------------------------------
# summary and registration
# ------------------------------------------------------------------------------------------------------------------


@task(name="log-loss-curve", cache_policy=NO_CACHE)
def log_loss_curve(run_id: str) -> None:
    """Plot the run's loss (and teacher entropy) against the step and log the PNG as a run artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss",):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("DINO loss")
    ax.grid(alpha=0.3)
    ax.legend()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "loss_curve.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        client.log_artifact(run_id, path)


@task(name="register-backbone", cache_policy=NO_CACHE)
def register_backbone(run_id: str, export_uri: str, registered_model: str, tags: dict[str, str],
                      alias: str = "candidate") -> int:
    """Log the exported teacher backbone as an MLflow model of the run, register it as a new version of
    ``registered_model`` with ``tags``, and point ``alias`` at it. Returns the version number."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dino_model.export import CONFIG_NAME, WEIGHTS_NAME, load_export_config
    from dino_model.mlflow_model import log_backbone_model

    logger = get_run_logger()
    client = MlflowClient()
    export_cfg = load_export_config(export_uri)
    store = open_store(export_uri)
    with tempfile.TemporaryDirectory() as tmp:
        for key in (WEIGHTS_NAME, CONFIG_NAME):
            Path(tmp, key).write_bytes(store.get_bytes(key))
        with mlflow.start_run(run_id=run_id):
            info = log_backbone_model(tmp, name="backbone", embed_dim=int(export_cfg["embed_dim"]),
                                      metadata={"arch": export_cfg["arch"], "patch_size": export_cfg["patch_size"]})
            # start_run/end_run would mark the run FINISHED; the flow sets the final status itself.
            mlflow.end_run(status="RUNNING")
    mv = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    client.set_registered_model_alias(registered_model, alias, mv.version)
    logger.info("registered %s version %s with alias %r", registered_model, mv.version, alias)
    return int(mv.version)


@task(name="end-mlflow-run", cache_policy=NO_CACHE)
def end_mlflow_run(run_id: str, status: str = "FINISHED") -> None:
    """Mark the MLflow run FINISHED or FAILED."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


@task(name="pretrain-summary", cache_policy=NO_CACHE)
def pretrain_summary(run_id: str, registered_model: str, version: int, end: dict[str, Any], facts: dict[str, Any],
                     export_uri: str) -> str:
    """A markdown artifact: what was trained, the final metrics, and links to the MLflow run and model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    base = mlflow.get_tracking_uri().rstrip("/")
    web = base.startswith("http")
    run_link = f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}" if web else run_id
    model_link = f"{base}/#/models/{registered_model}/versions/{version}" if web else f"models:/{registered_model}/{version}"
    metrics = run.data.metrics
    lines = [
        f"# DINO pretraining: {registered_model} v{version}",
        "",
        f"- MLflow run: [{run_id}]({run_link})" if web else f"- MLflow run: `{run_id}` ({base})",
        f"- Registered model: [{registered_model} v{version}]({model_link})" if web else f"- Registered model: `{model_link}`",
        f"- Export: `{export_uri}`",
        f"- Data: {facts.get('samples', '?')} samples in {facts.get('shards', '?')} shards "
        f"(hash `{str(facts.get('dataset_hash', '-'))[:12]}`)",
        f"- Steps: {end.get('step', '?')}",
        *[f"- Fast path · {part}: {r['verdict']} — {r['path']}" for part, r in (end.get("fast_path") or {}).items()],
        "",
        "| metric | last value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if not k.startswith("system/")],
    ]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="dino-pretrain-summary", description="DINO pretraining run")
    return markdown

"""Prefect tasks of the ``dino-pretrain`` flow: resolve the config, pre-flight checks, the MLflow run, the trainer
launch, the run's summary, and the model registration. Each task does one thing with one side effect; clients
(boto3, MLflow) are created inside the task that uses them. No task caches its inputs: every one has side effects
or reads state that changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from dino_model.checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint_config
from dino_model.config import ConfigError, DinoConfig
from dino_model.storage import StorageError, open_store
from tasks.validation import (
    RESUME_POLICIES,  # noqa: F401 - re-exported: the policies dino-pretrain accepts
    PreflightError,
    check_pretrain_request,
    problems_message,
    retry_unless_user_error,
)
from tasks.validation.training import pretrain_problems

from .kubernetes_job import KubernetesSettings
from .kubernetes_job import preflight_problems as kubernetes_preflight
from .listeners import Listeners
from .model_card import HARDWARE_TAG, version_page
from .registration import register_export
from .tracking import flatten, get_or_create_experiment, mlflow_ui_link
from .training_progress import TrainingProgress, describe_hardware
from .trainer_process import LaunchSpec, run_trainer, torchrun_command, trainer_config

#: Tag on the MLflow run that ties it to the Prefect flow run driving it now, so a retried flow and the flow's
#: cancellation and crash hooks find it (a flow run that resumes a checkpoint moves the tag to itself).
FLOW_RUN_TAG = "prefect.flow_run_id"

#: In-process followers of the trainer's progress records (the ``dino pretrain`` progress bar): ``fn(record)``.
trainer_progress = Listeners()


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
    launch: LaunchSpec | None = None,
    resume: str = "auto",
) -> dict[str, Any]:
    """Preset, then the config file, then the overrides, then ``data`` and ``checkpoint_uri``: the resolved,
    validated training config as a plain dict (what is logged to MLflow and saved in every checkpoint).

    The flow's first task: it runs every check that needs no side effect (config, launch, resume policy, the
    data's manifest and shards), the same ones ``dino pretrain`` runs before starting Prefect
    (:func:`tasks.validation.check_pretrain_request`), so a bad request fails here with the same message."""
    return check_pretrain_request(data, checkpoint_uri, preset, config_file, overrides, launch, resume)


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(config: dict[str, Any], launch: LaunchSpec, resume: str = "auto",
              kubernetes: KubernetesSettings | None = None) -> dict[str, Any]:
    """Check, before any GPU time is spent, that the config is valid, the data readable and consistent, MLflow
    reachable, the checkpoint URI writable (a probe write) and its checkpoints as the resume policy wants. Raises
    :class:`PreflightError` listing every failure. Returns facts the flow tags the run with (dataset hash, sample
    count). With ``kubernetes``, the pods' GPUs replace this worker's in the checks, and the launch's own
    requirements are checked (kubectl, addresses the pods reach)."""
    logger = get_run_logger()
    problems: list[str] = []
    facts: dict[str, Any] = {}

    # The first task's checks again (the data may have changed since), then what needs this worker or a write.
    problems += pretrain_problems(config, launch, resume, facts)
    try:
        cfg = DinoConfig.from_dict(config)
    except ConfigError as e:
        raise PreflightError(problems_message("pre-flight failed", problems)) from e
    problems += _check_mlflow()
    problems += _check_checkpoints(cfg.checkpoint.uri, facts)
    if kubernetes is None:
        problems += _check_devices(cfg, launch)
    else:
        import mlflow

        problems += kubernetes_preflight(kubernetes, launch, cfg.data.source, cfg.checkpoint.uri,
                                         mlflow.get_tracking_uri())
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
    """The MLflow run of this training, so that one training is one run whatever stops and resumes it:

    1. the run tagged with this flow run (a retry of the flow);
    2. else the run the latest checkpoint under ``checkpoint.uri`` was logged into, unless that run is FINISHED (a
       new flow run resuming a cancelled, crashed or failed training continues its curve: the trainer logs only the
       steps after the ones the run holds);
    3. else a new run with the resolved config as params and the dataset hash, git commit and checkpoint URI as
       tags.

    Before that, the experiment's runs left RUNNING by flow runs that are over are ended (a flow-run process that
    was killed outright could not end its own)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logger = get_run_logger()
    client = MlflowClient()
    exp_id = get_or_create_experiment(client, experiment)
    _close_abandoned_runs(client, exp_id, flow_run_id, logger)
    found = client.search_runs([exp_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        logger.info("resuming MLflow run %s", run_id)
        return run_id
    continued = _continue_recorded_run(client, config, flow_run_id, logger)
    if continued:
        return continued
    all_tags = {FLOW_RUN_TAG: flow_run_id, "git_commit": git_commit(), "checkpoint_uri": config["checkpoint"]["uri"],
                **(tags or {})}
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limit
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    _log_config(client, run.info.run_id, config, "config.json")
    logger.info("MLflow run %s in experiment %r (%s)", run.info.run_id, experiment, mlflow.get_tracking_uri())
    return run.info.run_id


def _close_abandoned_runs(client, exp_id: str, flow_run_id: str, logger) -> None:
    """End the RUNNING MLflow runs of the experiment whose flow run is over on the Prefect server without having
    ended them: a flow-run process killed outright runs no hook, and the zombie-run automation marks the flow run
    Crashed, not its MLflow run. KILLED when the trainer recorded a stop on request, else FAILED."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    stale = [r for r in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=100)
             if r.data.tags.get(FLOW_RUN_TAG) not in (None, flow_run_id, "local")]
    if not stale:
        return
    with get_client(sync_client=True) as prefect:
        for run in stale:
            try:
                state = prefect.read_flow_run(UUID(run.data.tags[FLOW_RUN_TAG])).state
            except Exception:  # noqa: BLE001 - a flow run this server does not know (another server, deleted)
                continue
            if state is None or not state.is_final():
                continue
            cancelled = run.data.tags.get("stop_reason") == "cancelled"
            client.set_tag(run.info.run_id, "stop_reason", "cancelled" if cancelled else "failed")
            client.set_terminated(run.info.run_id, status="KILLED" if cancelled else "FAILED")
            logger.warning("MLflow run %s was still RUNNING though its flow run %s ended %s: marked %s", run.info.run_id,
                           run.data.tags[FLOW_RUN_TAG], state.type.value, "KILLED" if cancelled else "FAILED")


def recorded_mlflow_run(checkpoint_uri: str) -> tuple[str | None, str | None]:
    """``(MLflow run id, checkpoint)``: the run the latest checkpoint under ``checkpoint_uri`` was logged into (the
    ``mlflow:<run id>`` logger of the config saved in it), or ``(None, checkpoint)``; ``(None, None)`` without
    checkpoints."""
    latest = latest_checkpoint(checkpoint_uri)
    if latest is None:
        return None, None
    for spec in read_checkpoint_config(latest).get("logging", {}).get("loggers", []):
        name, _, run_id = str(spec).partition(":")
        if name == "mlflow" and run_id:
            return run_id, latest
    return None, latest


def _continue_recorded_run(client, config: dict[str, Any], flow_run_id: str, logger) -> str | None:
    """Step 2 of :func:`open_mlflow_run`: the recorded run, set RUNNING and tagged with this flow run, or None."""
    from mlflow.exceptions import MlflowException

    run_id, checkpoint = recorded_mlflow_run(config["checkpoint"]["uri"])
    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        logger.warning("checkpoint %s was logged into MLflow run %s, which %s does not hold (any more): the "
                       "training continues in a new run", checkpoint, run_id, client.tracking_uri)
        return None
    if run.info.status == "FINISHED":
        logger.info("checkpoint %s belongs to MLflow run %s, which is FINISHED: a new run records this training",
                    checkpoint, run_id)
        return None
    client.set_tag(run_id, FLOW_RUN_TAG, flow_run_id)
    client.update_run(run_id, status="RUNNING")
    logged = run.data.tags.get("steps_done", "?")
    logger.info("continuing MLflow run %s (%s, %s steps recorded) where checkpoint %s was logged: one run holds the "
                "whole training", run_id, run.info.status, logged, checkpoint)
    changed = sorted(k for k, v in flatten(config).items() if run.data.params.get(k) != v[:6000])
    if changed:
        # MLflow params cannot change: the resumed run's config goes beside the first one as an artifact.
        name = f"config-{flow_run_id[:8]}.json"
        _log_config(client, run_id, config, name)
        logger.warning("the config differs from the run's params in %s; the resumed config is logged as %s",
                       ", ".join(changed[:10]) + (" ..." if len(changed) > 10 else ""), name)
    return run_id


def _log_config(client, run_id: str, config: dict[str, Any], name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        Path(path).write_text(json.dumps(config, indent=2))
        client.log_artifact(run_id, path)


# ------------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------------


def progress_reporter(logger, run_id: str | None = None,
                      accelerator: str | None = None) -> tuple[Any, Callable[[dict], None]]:
    """A progress artifact and the callback that feeds it from the trainer's progress records (at most every 2 s:
    step x/y, epoch, loss, images/s, time left — :class:`tasks.training_progress.TrainingProgress`), logs the
    trainer's milestones and forwards every record to :data:`trainer_progress`. With ``run_id``, the start
    record's machines (``accelerator``: the device model, when known) become the MLflow run's ``hardware`` tag.
    Used by both launchers."""
    progress_id = create_progress_artifact(0.0, description="DINO pretraining: starting")
    state = TrainingProgress()
    last_update = [0.0]

    def on_progress(record: dict) -> None:
        trainer_progress.emit(record)
        state.update(record)
        event = record.get("event")
        if event == "step" and record.get("total_steps"):
            if time.monotonic() - last_update[0] > 2.0:
                last_update[0] = time.monotonic()
                update_progress_artifact(progress_id, state.percent(), description=state.describe())
        elif event in ("start", "fast_path", "checkpoint", "epoch", "end", "error"):
            logger.info("trainer %s: %s", event,
                        {k: v for k, v in record.items() if k not in ("event", "time", "config", "fast_path")})
            if event == "start" and run_id:
                from mlflow.tracking import MlflowClient

                MlflowClient().set_tag(run_id, HARDWARE_TAG, describe_hardware(record, accelerator))
            if event == "end" and state.last:
                update_progress_artifact(progress_id, state.percent(),
                                         description=f"{state.describe()} · {record.get('status', 'ended')}")
        for part, verdict in _fast_path_records(record).items():
            log = logger.warning if verdict["status"] == "fallback" else logger.info
            log("fast path %s: %s (%s)", part, verdict["verdict"], verdict["path"])

    return progress_id, on_progress


def local_accelerator(config: dict[str, Any]) -> str | None:
    """``'NVIDIA H100 80GB HBM3'`` when the trainer runs on this machine's CUDA GPUs, else None."""
    import torch

    if config.get("train", {}).get("device") == "cpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def _fast_path_records(record: dict) -> dict[str, dict]:
    """The fast-path verdicts a progress record carries (``start`` / ``end`` / ``error`` hold them under
    ``fast_path``; a ``fast_path`` event is made of them)."""
    if record.get("event") == "fast_path":
        return {k: v for k, v in record.items() if isinstance(v, dict) and "verdict" in v}
    if record.get("event") in ("start", "error"):
        return dict(record.get("fast_path") or {})
    return {}


@task(name="train", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error)
def train(config: dict[str, Any], run_id: str, launch: LaunchSpec) -> dict[str, Any]:
    """Run ``torchrun -m dino_model.train`` on this worker until it finishes. A retry resumes from the latest
    checkpoint (the trainer does that by itself) and logs into the same MLflow run, skipping steps it already has.
    Returns the trainer's ``end`` record.

    Stopped (the trainer then checkpoints, see :func:`tasks.trainer_process.run_trainer`): when the flow run is
    being cancelled, the record has ``status`` ``cancelled`` (a normal outcome, logged as a warning; the flow then
    ends Cancelled); any other stop (the worker or the machine shutting down, Ctrl-C) takes its course as the
    signal it is (the flow run crashes). Neither is retried.
    """
    import mlflow

    logger = get_run_logger()
    config = trainer_config(config, run_id)
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_RUN_ID": run_id, **launch.extra_env}
    progress_id, on_progress = progress_reporter(logger, run_id, local_accelerator(config))
    stopped: dict[str, Any] = {}

    def on_stop(signum: int, end: dict | None) -> None:
        end = stopped["end"] = end or {}
        stopped["cancelled"] = _flow_run_cancelling()
        what = "cancelled" if stopped["cancelled"] else f"stopped by {signal.Signals(signum).name}"
        stopped["message"] = (f"training {what} at step {end.get('step', '?')} of {end.get('total_steps', '?')}; "
                              f"checkpoint: {end.get('checkpoint') or 'none'}")
        logger.warning("%s. A flow run with the same checkpoint_uri resumes from it, in the same MLflow run.",
                       stopped["message"])

    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "config.json")
        Path(config_path).write_text(json.dumps(config))
        cmd = torchrun_command(launch, config_path)
        logger.info("launching: %s", " ".join(cmd))
        try:
            end = run_trainer(cmd, env, on_line=logger.info, on_progress=on_progress, on_stop=on_stop)
        except BaseException:
            if stopped.get("cancelled"):
                # Not a crash of this task: the flow ends the run as Prefect cancels one (see flows/pretrain.py).
                return {**stopped["end"], "status": "cancelled"}
            raise
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
    ``registered_model`` with ``tags``, and point ``alias`` at it (:func:`tasks.registration.register_export`, which
    ``dino register`` uses too). Returns the version number."""
    version = register_export(run_id, export_uri, registered_model, tags, alias)
    get_run_logger().info("registered %s version %s with alias %r", registered_model, version, alias)
    return version


@task(name="end-mlflow-run", cache_policy=NO_CACHE)
def end_mlflow_run(run_id: str, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    """Tag the MLflow run (e.g. :func:`outcome_tags`) and mark it FINISHED, FAILED or KILLED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=status)


def outcome_tags(end: dict[str, Any]) -> dict[str, str]:
    """What the training did, from the trainer's ``end`` record: ``steps_done``, ``steps_total``, ``epochs_done``
    (fractional) and ``stop_reason`` (``completed`` / ``max_steps``)."""
    from dino_model.mlflow_logger import epochs_text

    tags = {"steps_done": str(end.get("step", "?")), "stop_reason": str(end.get("status", "?"))}
    if end.get("total_steps") is not None:
        tags["steps_total"] = str(end["total_steps"])
    if end.get("epochs_done") is not None:
        tags["epochs_done"] = epochs_text(float(end["epochs_done"]))
    return tags


# ------------------------------------------------------------------------------------------------------------------
# flow hooks: a cancelled or crashed flow run still ends its MLflow run
# ------------------------------------------------------------------------------------------------------------------


def end_mlflow_run_on_cancellation(flow, flow_run, state) -> None:
    """``on_cancellation`` hook of ``dino-pretrain``: the flow run's MLflow run ends KILLED, ``stop_reason``
    ``cancelled`` (the trainer has checkpointed: a new flow run with the same checkpoint URI continues it)."""
    _end_mlflow_run_of(flow, flow_run, "KILLED", "cancelled")


def end_mlflow_run_on_crash(flow, flow_run, state) -> None:
    """``on_crashed`` hook of ``dino-pretrain``: the flow run's MLflow run ends FAILED, ``stop_reason`` ``failed``
    — or KILLED / ``cancelled`` when the trainer recorded that it was stopped on request and checkpointed (the
    worker or the stack shut down, Ctrl-C)."""
    _end_mlflow_run_of(flow, flow_run, "FAILED", "failed")


def _end_mlflow_run_of(flow, flow_run, status: str, stop_reason: str) -> None:
    """End the RUNNING MLflow run tagged with ``flow_run``'s id (a hook runs in the flow-run process or in the
    worker's hook process; both have the worker's ``MLFLOW_TRACKING_URI``). Never raises: a hook that fails would
    only hide the state the run reached."""
    import inspect

    from mlflow.tracking import MlflowClient
    from prefect.logging.loggers import flow_run_logger

    log = flow_run_logger(flow_run, flow)  # into the flow run's logs, wherever the hook runs
    try:
        experiment = (flow_run.parameters or {}).get("experiment") or \
            inspect.signature(flow.fn).parameters["experiment"].default
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return
        runs = client.search_runs([exp.experiment_id], max_results=1,
                                  filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run.id}'")
        if not runs or runs[0].info.status != "RUNNING":
            return
        run = runs[0]
        if status == "FAILED" and run.data.tags.get("stop_reason") == "cancelled":
            status, stop_reason = "KILLED", "cancelled"
        client.set_tag(run.info.run_id, "stop_reason", stop_reason)
        client.set_terminated(run.info.run_id, status=status)
        log.warning("MLflow run %s ended %s (stop_reason=%s, steps done: %s of %s)", run.info.run_id, status,
                    stop_reason, run.data.tags.get("steps_done", "?"), run.data.tags.get("steps_total", "?"))
    except Exception as e:  # noqa: BLE001
        log.warning("could not end the MLflow run of flow run %s: %s: %s", flow_run.id, type(e).__name__, e)


def _flow_run_cancelling() -> bool:
    """Whether this flow run is being cancelled (its state on the Prefect server is Cancelling or Cancelled)."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.get_id()).state
        return bool(state and (state.is_cancelling() or state.is_cancelled()))
    except Exception:  # noqa: BLE001 - no server (a local run): not a cancellation
        return False


@task(name="pretrain-summary", cache_policy=NO_CACHE)
def pretrain_summary(run_id: str, registered_model: str, version: int, end: dict[str, Any], facts: dict[str, Any],
                     export_uri: str) -> str:
    """A markdown artifact: what was trained, the final metrics, and links to the MLflow run and model."""
    import mlflow
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(run_id)
    base = mlflow.get_tracking_uri().rstrip("/")
    run_link = mlflow_ui_link(f"experiments/{run.info.experiment_id}/runs/{run_id}")
    model_link = mlflow_ui_link(version_page(registered_model, version))
    metrics = run.data.metrics
    lines = [
        f"# DINO pretraining: {registered_model} v{version}",
        "",
        f"- MLflow run: [{run_id}]({run_link})" if run_link else f"- MLflow run: `{run_id}` ({base})",
        f"- Registered model: [{registered_model} v{version}]({model_link}) (its description is the model card)"
        if model_link else f"- Registered model: `models:/{registered_model}/{version}`",
        f"- Export: `{export_uri}`",
        f"- Data: {facts.get('samples', '?')} samples in {facts.get('shards', '?')} shards "
        f"(hash `{str(facts.get('dataset_hash', '-'))[:12]}`)",
        f"- Steps: {end.get('step', '?')} of {end.get('total_steps', '?')} ({outcome_tags(end).get('epochs_done', '?')}"
        f" epochs), stopped: {end.get('status', '?')}",
        f"- Hardware: {run.data.tags.get(HARDWARE_TAG, 'not recorded')}",
        *[f"- Fast path · {part}: {r['verdict']} — {r['path']}" for part, r in (end.get("fast_path") or {}).items()],
        "",
        "| metric | last value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items()) if not k.startswith("system/")],
    ]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="dino-pretrain-summary", description="DINO pretraining run")
    return markdown

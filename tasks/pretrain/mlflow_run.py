"""The MLflow run of one training, from start to end, so that one training is one run whatever stops and resumes
it: opened (a new run, the run of this flow run, or the run the latest checkpoint was logged into), ended with the
outcome's tags (``steps_done``, ``steps_total``, ``epochs_done``, ``stop_reason``) and a final status, and ended by
the flow's ``on_cancellation`` / ``on_crashed`` hooks (KILLED / FAILED) when the flow run does not get that far. A
flow-run process killed outright runs no hook: the next :func:`open_mlflow_run` of its experiment ends its run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dino_model.checkpoint import latest_checkpoint, read_checkpoint_config

from ..tracking import flatten, get_or_create_experiment

#: Tag on the MLflow run that ties it to the Prefect flow run driving it now, so a retried flow and the flow's
#: cancellation and crash hooks find it (a flow run that resumes a checkpoint moves the tag to itself).
FLOW_RUN_TAG = "prefect.flow_run_id"


def git_commit() -> str:
    """The project's git commit: the checkout's, else ``DINO_GIT_COMMIT`` (the trainer image records the commit it
    was built from there: it has no ``.git``), else ``unknown``."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return os.environ.get("DINO_GIT_COMMIT") or "unknown"


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
            recorded = run.data.tags.get("stop_reason", "")
            cancelled = recorded == "cancelled" or recorded.startswith(SIGNAL_STOP)
            client.set_tag(run.info.run_id, "stop_reason", recorded if cancelled else "failed")
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
    — or KILLED with the recorded ``cancelled`` / ``signal:<NAME>`` when the trainer was stopped on request and
    checkpointed (the worker or the stack shut down; a signal to ``dino pretrain``: Ctrl-C, a closed terminal,
    ``kill``)."""
    _end_mlflow_run_of(flow, flow_run, "FAILED", "failed")


#: ``stop_reason`` prefix of a training a signal to its command stopped (``signal:SIGHUP``; flows/cli/stops.py).
SIGNAL_STOP = "signal:"


def record_signal_stop(run_id: str, signum: int) -> None:
    """Tag the MLflow run ``stop_reason=signal:<NAME>``: the trainer checkpointed because its command (or the flow
    run's process) got ``signum``, which was no cancellation of the flow run; the crash hook then ends the run KILLED
    with that reason. Never raises (a stop must go on)."""
    import signal

    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().set_tag(run_id, "stop_reason", f"{SIGNAL_STOP}{signal.Signals(signum).name}")
    except Exception as e:  # noqa: BLE001 - the crash hook then ends the run FAILED: said, not raised
        logging.getLogger(__name__).warning("could not record the stop by %s on MLflow run %s: %s",
                                            signal.Signals(signum).name, run_id, e)


def _end_mlflow_run_of(flow, flow_run, status: str, stop_reason: str) -> None:
    """End the RUNNING MLflow run tagged with ``flow_run``'s id (a hook runs in the flow-run process or in the
    worker's hook process; both have the worker's ``MLFLOW_TRACKING_URI``). Never raises: a hook that fails would
    only hide the state the run reached."""
    from mlflow.tracking import MlflowClient
    from prefect.logging.loggers import flow_run_logger

    from .settings import tracking_of

    log = flow_run_logger(flow_run, flow)  # into the flow run's logs, wherever the hook runs
    try:
        experiment = tracking_of(flow_run).experiment
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return
        runs = client.search_runs([exp.experiment_id], max_results=1,
                                  filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run.id}'")
        if not runs or runs[0].info.status != "RUNNING":
            return
        run = runs[0]
        recorded = run.data.tags.get("stop_reason", "")
        if status == "FAILED" and (recorded == "cancelled" or recorded.startswith(SIGNAL_STOP)):
            status, stop_reason = "KILLED", recorded  # a stop on request: the trainer checkpointed
        client.set_tag(run.info.run_id, "stop_reason", stop_reason)
        client.set_terminated(run.info.run_id, status=status)
        log.warning("MLflow run %s ended %s (stop_reason=%s, steps done: %s of %s)", run.info.run_id, status,
                    stop_reason, run.data.tags.get("steps_done", "?"), run.data.tags.get("steps_total", "?"))
    except Exception as e:  # noqa: BLE001
        log.warning("could not end the MLflow run of flow run %s: %s: %s", flow_run.id, type(e).__name__, e)

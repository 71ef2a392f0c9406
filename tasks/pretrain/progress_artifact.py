"""The trainer's progress as the flow run shows it, for every launcher: a Prefect progress artifact (step x/y,
epoch, loss, images/s, time left, the training-health verdict and the learning curve:
:class:`tasks.pretrain.training_progress.TrainingProgress`), the trainer's milestones, health verdicts and
fast-path verdicts in the run's log, the MLflow run's ``hardware`` tag, and
:data:`trainer_progress`, the in-process listeners (the ``dino pretrain`` progress bar)."""

from __future__ import annotations

import time
from typing import Any, Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from ..listeners import Listeners
from ..model_card import HARDWARE_TAG
from .training_progress import TrainingProgress, describe_hardware

#: In-process followers of the trainer's progress records (the ``dino pretrain`` progress bar): ``fn(record)``.
trainer_progress = Listeners()


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
        elif event in ("health", "knn"):
            _log_learning(logger, record)
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


def _log_learning(logger, record: dict) -> None:
    """A learning-curve point in the flow run's log; a health verdict when it changes (a WARNING when bad)."""
    if record.get("event") == "knn":
        points = {k: v for k, v in record.items() if k.startswith("monitor.knn")}
        logger.info("learning curve at step %s: %s", record.get("step"),
                    ", ".join(f"{k} {v:.2f} %" for k, v in points.items()))
    elif record.get("changed"):
        log = logger.info if record.get("called") == "healthy" else logger.warning
        log("training health: %s", record.get("text") or record.get("called"))


def _fast_path_records(record: dict) -> dict[str, dict]:
    """The fast-path verdicts a progress record carries (``start`` / ``end`` / ``error`` hold them under
    ``fast_path``; a ``fast_path`` event is made of them)."""
    if record.get("event") == "fast_path":
        return {k: v for k, v in record.items() if isinstance(v, dict) and "verdict" in v}
    if record.get("event") in ("start", "error"):
        return dict(record.get("fast_path") or {})
    return {}


def finish_progress(progress_id: Any) -> None:
    """The progress artifact at 100 % once the trainer is done."""
    update_progress_artifact(progress_id, 100.0)

"""What every launcher does when its trainer is stopped by a signal (:mod:`tasks.pretrain.local`,
:mod:`tasks.pretrain.slurm`): the trainer has checkpointed; a cancellation of the flow run is a normal outcome
(the task returns the trainer's end record with ``status`` ``cancelled`` and the flow ends Cancelled), any other
stop (the worker or the machine shutting down, Ctrl-C) is recorded on the MLflow run as the signal it is and takes
its course (the flow run crashes). Neither is retried."""

from __future__ import annotations

import signal
from typing import Any, Callable

from .mlflow_run import record_signal_stop
from .progress_artifact import finish_progress


class TrainerStop:
    """The ``on_stop`` callback of a trainer's follower, and what it saw."""

    def __init__(self, logger: Any, run_id: str):
        self.logger, self.run_id = logger, run_id
        self.end: dict[str, Any] = {}
        self.cancelled = False

    def __call__(self, signum: int, end: dict | None) -> None:
        """The trainer got ``signum`` and stopped with ``end`` (its last record: step, checkpoint)."""
        self.end = end or {}
        self.cancelled = flow_run_cancelling()
        if not self.cancelled:
            record_signal_stop(self.run_id, signum)  # the flow's crash hook ends the MLflow run KILLED with it
        what = "cancelled" if self.cancelled else f"stopped by {signal.Signals(signum).name}"
        self.logger.warning("training %s at step %s of %s; checkpoint: %s. A flow run with the same checkpoint_uri "
                            "resumes from it, in the same MLflow run.", what, self.end.get("step", "?"),
                            self.end.get("total_steps", "?"), self.end.get("checkpoint") or "none")

    def follow(self, run: Callable[[], dict | None], progress_id: Any) -> dict[str, Any]:
        """The launcher's result: ``run()`` (which follows the trainer with this object as its ``on_stop``) and its
        end record, with the progress artifact finished. When the flow run is being cancelled its exception is not
        a crash of the task: the trainer's end record is returned with ``status`` ``cancelled``, and the flow ends
        the run as Prefect cancels one (see flows/pretrain.py)."""
        try:
            end = run()
        except BaseException:
            if not self.cancelled:
                raise
            return {**self.end, "status": "cancelled"}
        finish_progress(progress_id)
        return end or {}


def flow_run_cancelling() -> bool:
    """Whether this flow run is being cancelled (its state on the Prefect server is Cancelling or Cancelled)."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run.get_id()).state
        return bool(state and (state.is_cancelling() or state.is_cancelled()))
    except Exception:  # noqa: BLE001 - no server (a local run): not a cancellation
        return False

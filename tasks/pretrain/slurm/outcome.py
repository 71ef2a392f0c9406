"""A finished Slurm job as the ``train-on-slurm`` task's outcome: the trainer's ``end`` record, or an error that says
what happened and what to do — retried by the task (a new job resuming from the latest checkpoint) unless a retry
cannot help (:class:`SlurmJobNotRetried`: a health stop, a job cancelled by someone else).

No accounting is assumed (``sacct``): the state and exit code come from ``scontrol show job`` while Slurm keeps the
job (``MinJobAge``), the trainer's side from the job's log (:class:`.job_log.JobLog`).
"""

from __future__ import annotations

from pathlib import Path

from tasks.validation.errors import is_user_error

from ..trainer_process import TrainerFailed
from .commands import exit_code
from .job_log import JobLog

#: The trainer's exit code for a health stop (dino_model.train.EXIT_COLLAPSED; not imported: that pulls in torch).
EXIT_COLLAPSED = 5
#: Rank 0's end statuses of a finished training.
FINISHED = ("completed", "max_steps")


class SlurmJobFailed(TrainerFailed):
    """The job failed in a way a new job may not (a crash, a lost node, the time limit): the task retries it."""


class SlurmJobNotRetried(TrainerFailed):
    """The job ended in a way a retry would only repeat or undo: a health stop of the trainer, a cancellation by
    someone else. Neither retried nor requeued. ``stop_reason``: the MLflow run's (``collapsed:<mode>``,
    ``stalled`` for a health stop)."""

    retriable = False

    def __init__(self, message: str, stop_reason: str = "failed"):
        super().__init__(message)
        self.stop_reason = stop_reason


def retry_slurm_failure(task, task_run, state) -> bool:
    """The ``train-on-slurm`` task's ``retry_condition_fn``: retry unless the input is bad or the job ended for
    good (:class:`SlurmJobNotRetried`)."""
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - the task's own exception, whatever it is
        return not (is_user_error(e) or isinstance(e, SlurmJobNotRetried))
    return True


def health_stop(log: JobLog) -> str | None:
    """The stop reason of a training that ``train.health=stop`` ended (``collapsed:<mode>``, ``stalled``): rank
    0's end record, else torchrun's report of a worker that exited with code 5."""
    status = str((log.end_record or {}).get("status", ""))
    if status.startswith("collapsed") or status == "stalled":
        return status
    if EXIT_COLLAPSED in log.worker_exit_codes():
        return "collapsed"
    return None


def job_outcome(job_id: str, fields: dict[str, str], state: str, log: JobLog, log_path: Path) -> dict | None:
    """The trainer's ``end`` record of a job that finished the training; None for a job Slurm preempted and did
    not requeue (submit it again); else :class:`SlurmJobFailed` / :class:`SlurmJobNotRetried` with the reason,
    the trainer's own error and the last lines of the log."""
    end = log.end_record or {}
    where = f"Slurm job {job_id} ({fields.get('JobName', '?')})"
    stopped = health_stop(log)
    if stopped:
        raise SlurmJobNotRetried(
            f"{where} ended {state}: the trainer stopped the training ({stopped}, train.health=stop) at step "
            f"{end.get('step', '?')}; checkpoint: {end.get('checkpoint') or 'none'}. Not retried nor requeued: a "
            "retry would collapse again. Change the recipe (teacher temperature, learning rate, centring; "
            f"docs/training-health.md) before resuming, or set train.health=warn.\n{_tail(log, log_path)}", stopped)
    if state == "COMPLETED":
        if end.get("status") in FINISHED:
            return end
        raise SlurmJobFailed(f"{where} COMPLETED but rank 0 reported no finished training (its last end record: "
                             f"{end.get('status', 'none')}): see the log.\n{_tail(log, log_path)}")
    if state == "PREEMPTED":
        return None
    code, sig = exit_code(fields)
    what = _WHAT.get(state, f"ended {state}")
    if "{" in what:
        what = what.format(code=code, signal=f", signal {sig}" if sig else "", nodes=fields.get("NodeList", "?"),
                           mem=fields.get("MinMemoryNode") or fields.get("mem") or "the cluster's default")
    error = log.trainer_error()
    message = f"{where} {what}" + (f": {error}" if error else "") + f". {_NEXT.get(state, _RETRY)}"
    if state == "CANCELLED":
        raise SlurmJobNotRetried(f"{message} Checkpoint: {end.get('checkpoint') or 'the latest under checkpoint_uri'}"
                                 f".\n{_tail(log, log_path)}")
    raise SlurmJobFailed(f"{message}\n{_tail(log, log_path)}")


_RETRY = ("The task retries it (launch.retries) with a new job that resumes from the latest checkpoint in the same "
          "MLflow run; if it fails the same way, fix the cause shown here.")
_WHAT = {
    "FAILED": "FAILED (exit code {code}{signal})",
    "OUT_OF_MEMORY": "ran OUT_OF_MEMORY (a process on {nodes} went over the job's memory, {mem})",
    "NODE_FAIL": "lost a node (NODE_FAIL on {nodes})",
    "TIMEOUT": "reached its time limit (TIMEOUT) before the trainers checkpointed and the job was requeued",
    "BOOT_FAIL": "could not boot its nodes (BOOT_FAIL on {nodes})",
    "DEADLINE": "reached its deadline (DEADLINE) before it could run",
    "CANCELLED": "was CANCELLED outside this flow run (scancel by a user or an administrator, or a policy)",
}
_NEXT = {
    "OUT_OF_MEMORY": "Raise slurm.mem (or lower data.batch_size_per_gpu / data.num_workers). " + _RETRY,
    "NODE_FAIL": _RETRY + " If it recurs on the same node, leave it out: slurm.extra_sbatch ['--exclude=NODE'].",
    "TIMEOUT": ("Raise slurm.signal_lead_s: it must cover a checkpoint write plus the ranks agreeing to stop "
                "(up to train.nonfinite_check_every steps: docs/operator-guide.md, \"A Slurm cluster\"). " + _RETRY),
    "CANCELLED": ("Not retried: whoever cancelled it meant it to stop. A new flow run with the same checkpoint_uri "
                  "resumes it in the same MLflow run."),
}


def _tail(log: JobLog, log_path: Path) -> str:
    return f"log: {log_path}\n{log.last_output()}"

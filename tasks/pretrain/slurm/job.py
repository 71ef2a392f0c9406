"""Submit a training's batch job and follow it to its end (no Prefect here: the ``train-on-slurm`` task wraps it).

1. The config and the batch script (:mod:`.batch_script`) are written to the job's folder on the shared
   filesystem and the job submitted with ``sbatch --parsable`` (the MLflow run id and tracking URI in sbatch's
   environment, which the job inherits: nothing secret in the script, its arguments or Slurm's job record).
2. Every ``poll_s`` seconds: ``scontrol show job -o`` (state, reason, restarts) and the job's log
   (:class:`.job_log.JobLog`: rank 0's lines to ``on_line``, progress records to ``on_progress``). A pending job's
   reason is reported when it changes; a job that started again (``Restarts`` grew: requeued at its time limit by
   the batch script, or by Slurm after a preemption, read from slurmstepd's notice in the log) is reported to
   ``on_requeue(reason, step, job_id)`` once the run it ended is over.
3. At the end the final state becomes the outcome (:func:`.outcome.job_outcome`); a job preempted without a
   requeue is submitted again (a new job id, same MLflow run, resuming).

A stop request here (SIGTERM / SIGINT: Prefect cancelling the flow run, Ctrl-C) stops the job the way Slurm's own
cancel would, but gives the trainers their checkpoint first: ``scancel --signal=TERM`` (the trainers checkpoint
and exit, the batch script ends), then ``scancel`` after ``slurm.cancel_grace_s`` if anything is left;
``on_stop(signum, end_record)`` is called and the stop re-raised, so it takes its usual course (Prefect:
Cancelled, never a retry). A second SIGINT meanwhile cancels at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Callable

from ..trainer_process import TrainerStopped
from .batch_script import SlurmJob
from .commands import (
    FINAL_STATES,
    SlurmCommandError,
    base_state,
    cancel_command,
    parse_job_id,
    parse_show_job,
    run_slurm,
    sbatch_command,
    show_job_command,
    signal_steps_command,
    squeue_state_command,
)
from .job_log import JobLog
from .outcome import job_outcome

#: How long a job Slurm no longer lists may take to show its last lines in the log (a shared filesystem lags).
_LOG_SETTLE_S = 10.0


def write_job_files(job: SlurmJob, config: dict, script: str) -> None:
    """The config and the batch script in the job's folder (owner-only: they name the MLflow run)."""
    job.job_dir.mkdir(parents=True, exist_ok=True)
    for path, text in ((job.config_path, json.dumps(config)), (job.script_path, script)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)


def submit(job: SlurmJob) -> str:
    """``sbatch --parsable`` the job's script, in its folder; the job id."""
    env = {**os.environ, **job.env}
    return parse_job_id(run_slurm(sbatch_command(str(job.script_path)), env=env, cwd=str(job.job_dir)))


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields; once Slurm has forgotten the job (after ``MinJobAge``), only the state
    ``squeue`` may still give, else ``{"JobState": "UNKNOWN"}``."""
    try:
        return parse_show_job(run_slurm(show_job_command(job_id)))
    except SlurmCommandError as e:
        if "Invalid job id" not in str(e):
            raise
    try:
        state = run_slurm(squeue_state_command(job_id)).strip()
    except SlurmCommandError:
        state = ""
    return {"JobId": job_id, "JobState": state or "UNKNOWN"}


def run_slurm_job(
    job: SlurmJob,
    config: dict,
    script: str,
    on_line: Callable[[str], None],
    on_progress: Callable[[dict], None],
    on_requeue: Callable[[str, int | None, str], None] = lambda reason, step, job_id: None,
    on_stop: Callable[[int, dict | None], None] | None = None,
    poll_s: float = 2.0,
) -> dict | None:
    """Submit ``job`` and follow it until the training is done (rank 0's ``end`` record) or the job fails
    (:class:`.outcome.SlurmJobFailed` / :class:`.outcome.SlurmJobNotRetried`); see the module docstring."""
    write_job_files(job, config, script)
    log = JobLog(on_line, on_progress)
    restore = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        restore = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        while True:
            job_id = submit(job)
            log.open(job.log_path(job_id))
            on_line(f"submitted Slurm job {job_id} ({job.name}): {job.nnodes} node(s) x {job.nproc_per_node} "
                    f"process(es); log {job.log_path(job_id)}")
            try:
                fields, state = _follow(job_id, log, on_line, on_requeue, poll_s)
            except BaseException as stop:
                _stop_job(job_id, log, on_line, job.settings.cancel_grace_s, poll_s)
                signum = getattr(stop, "signal", None) or (signal.SIGINT if isinstance(stop, KeyboardInterrupt)
                                                           else signal.SIGTERM)
                if on_stop is not None:
                    on_stop(int(signum), log.end_record)
                raise
            end = job_outcome(job_id, fields, state, log, job.log_path(job_id))
            if end is not None:
                return end
            on_requeue("preempted", (log.end_record or {}).get("step"), job_id)
            on_line(f"Slurm job {job_id} was PREEMPTED and not requeued: submitting it again (it resumes from the "
                    "latest checkpoint)")
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


def _follow(job_id: str, log: JobLog, on_line, on_requeue, poll_s: float) -> tuple[dict[str, str], str]:
    """Poll the job and its log until a final state; ``(scontrol's fields, the base state)``."""
    restarts, reason_seen, gone_since = 0, "", None
    while True:
        fields = job_fields(job_id)
        log.poll()
        state = base_state(fields.get("JobState", ""))
        count = int(fields.get("Restarts", restarts) or 0)
        # Slurm counts a requeue (its own, after a preemption) as soon as it decides it, while the run it ends is
        # still COMPLETING: its trainers still checkpointing on SIGTERM. Reported once that run is over, with its
        # last lines read (the step it stopped at, slurmstepd's notice of why).
        if count > restarts and state not in ("COMPLETING", "REQUEUED"):
            why = log.requeue_reason()
            on_requeue(why, (log.end_record or {}).get("step"), job_id)
            on_line(f"Slurm job {job_id} requeued ({why}, restart {count}): it resumes from its checkpoint")
            restarts = count
            log.new_run()
        if state == "PENDING":
            reason = fields.get("Reason", "")
            if reason and reason != reason_seen and reason != "None":
                on_line(f"Slurm job {job_id} is pending: {reason}")
            reason_seen = reason
        elif state == "RUNNING":
            reason_seen = ""
        if state in FINAL_STATES:
            _settle(log, fields, state)
            return fields, state
        if state == "UNKNOWN":  # Slurm forgot it: whatever the log says is all there is
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > _LOG_SETTLE_S:
                log.flush()
                return fields, "COMPLETED" if (log.end_record or {}).get("status") in ("completed",
                                                                                         "max_steps") else "FAILED"
        time.sleep(poll_s)


def _settle(log: JobLog, fields: dict[str, str], state: str) -> None:
    """Read the log to its end: the batch script's last line once it is there (a shared filesystem may show it a
    little after Slurm reports the state)."""
    deadline = time.monotonic() + _LOG_SETTLE_S
    while True:
        log.flush()
        last = list(log.tails.get("batch", ()))[-1:] or [""]
        if "trainers exited" in last[0] or "not requeued" in last[0] or time.monotonic() > deadline \
                or state not in ("COMPLETED", "FAILED"):
            return
        time.sleep(0.5)


def _stop_job(job_id: str, log: JobLog, on_line, grace_s: float, poll_s: float) -> None:
    """SIGTERM to the trainers, up to ``grace_s`` for them to checkpoint and the job to end, then ``scancel``."""
    previous = {}
    cancelled = []

    def cancel_now(*_):
        if not cancelled:
            cancelled.append(True)
            _try(cancel_command(job_id), on_line)

    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: None)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, cancel_now)
    try:
        state = base_state(job_fields(job_id).get("JobState", ""))
        if state in ("RUNNING", "COMPLETING", "SUSPENDED"):
            on_line(f"stopping Slurm job {job_id}: SIGTERM to its trainers, which checkpoint (up to {grace_s:.0f} s)")
            _try(signal_steps_command(job_id), on_line)
        else:
            cancel_now()
        deadline = time.monotonic() + grace_s
        while state not in FINAL_STATES and state != "UNKNOWN":
            if time.monotonic() > deadline:
                on_line(f"Slurm job {job_id} still {state} after {grace_s:.0f} s: cancelling it")
                cancel_now()
                deadline = time.monotonic() + 120.0  # scancel's own KillWait, then Slurm kills what is left
            time.sleep(poll_s)
            log.poll()
            state = base_state(job_fields(job_id).get("JobState", ""))
        cancel_now()  # a requeued job would start again; a finished one answers "already completed" (ignored)
        log.flush()
        on_line(f"Slurm job {job_id} ended {state}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _try(cmd: list[str], on_line) -> None:
    try:
        run_slurm(cmd)
    except SlurmCommandError as e:
        if "already completing or completed" not in str(e) and "Invalid job id" not in str(e):
            on_line(str(e))


def _raise_stopped(signum, _frame):
    raise TrainerStopped(signum)

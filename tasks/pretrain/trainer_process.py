"""Launch ``torchrun -m dino_model.train`` as a child process and follow it (no Prefect here: the task wraps it).

The same launcher runs other torchrun entry points (``module=``), e.g. the multi-process feature extraction
``torchrun -m dino_model.eval.extract`` of the ``extract-features`` task.

torch.distributed stays out of the orchestrating process: the trainer runs in its own process group of workers
started by torchrun. This module builds the command line, streams the child's output line by line to a callback
(the Prefect task forwards it to the flow-run logs and turns ``DINO_PROGRESS`` lines into a progress artifact) and
keeps the last lines for the error message.

Stopping. The trainer never outlives this process:

* SIGTERM / SIGINT here (Prefect cancelling the flow run, Ctrl-C in ``dino pretrain``) raises in the waiting
  thread (Prefect's termination signal, KeyboardInterrupt); the launcher then sends one SIGTERM to torchrun, which
  passes it to its workers; the trainer finishes its step, writes a checkpoint and exits; then the exception
  continues (Prefect: the flow run ends Cancelled or Crashed), so a stop is never mistaken for a failure to retry.
  torchrun runs in its own session, so a signal sent to this process's group reaches the trainer only this way.
* If this process dies without a chance to forward anything (SIGKILL, OOM), the kernel sends SIGTERM to torchrun
  (``PR_SET_PDEATHSIG``, set between fork and exec) and to every worker should torchrun die too
  (``DINO_PARENT_DEATH_SIGNAL``, read by the trainer at start): the same clean stop, with nobody waiting for it.

A trainer that ignores SIGTERM is killed by torchrun after ``LaunchSpec.shutdown_timeout_s``; a torchrun that
outlives that by 30 s is killed here with every process under it.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import psutil

from dino_model.metrics import parse_progress_line
from dino_model.parent_death import ENV_VAR as PARENT_DEATH_ENV
from dino_model.parent_death import exit_with_parent


@dataclass
class LaunchSpec:
    """How many processes to start and where they meet."""

    nproc_per_node: int = 1
    """Processes on this machine (one per GPU; on CPU, gloo processes)."""
    nnodes: int = 1
    """Machines taking part. With more than one, every node runs the same command with the same endpoint."""
    rdzv_endpoint: str = ""
    """``HOST:PORT`` of the c10d rendezvous when ``nnodes > 1``."""
    rdzv_id: str = "dino"
    """Rendezvous id shared by the nodes of one job (the flow uses its run id)."""
    extra_env: dict[str, str] = field(default_factory=dict)
    """Environment added to the trainer's (e.g. ``MLFLOW_TRACKING_URI``)."""
    shutdown_timeout_s: int = 120
    """After SIGTERM, how long torchrun lets its workers finish their step and write their checkpoint before it
    kills them."""

    def validate(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if self.nnodes > 1 and ":" not in self.rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint must be HOST:PORT when nnodes > 1, got {self.rdzv_endpoint!r}")
        if self.shutdown_timeout_s < 1:
            raise ValueError(f"shutdown_timeout_s must be >= 1, got {self.shutdown_timeout_s}")


def torchrun_command(
    spec: LaunchSpec, config_path: str | None, overrides: list[str] = (), module: str = "dino_model.train"
) -> list[str]:
    """The exact command line: ``python -m torch.distributed.run ... -m dino_model.train --config FILE``.

    ``module`` runs another entry point; ``config_path=None`` leaves out ``--config`` (the module's arguments are
    then all in ``overrides``)."""
    spec.validate()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec.nproc_per_node}"]
    if spec.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += [
            f"--nnodes={spec.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={spec.rdzv_endpoint}",
            f"--rdzv-id={spec.rdzv_id}",
        ]
    # Failures are retried by the flow, which resumes from the latest checkpoint: torchrun itself does not restart.
    cmd += ["--max-restarts=0", f"--shutdown-timeout={spec.shutdown_timeout_s}", "-m", module]
    if config_path is not None:
        cmd += ["--config", config_path]
    cmd += list(overrides)
    return cmd


def trainer_config(config: dict, run_id: str) -> dict:
    """The config the trainer is launched with: the resolved ``config`` with rank 0 logging into MLflow run
    ``run_id`` (its other loggers kept) and printing the progress lines the launchers follow."""
    config = json.loads(json.dumps(config))
    loggers = [s for s in config["logging"]["loggers"] if not s.startswith("mlflow")]
    config["logging"]["loggers"] = loggers + [f"mlflow:{run_id}"]
    config["logging"]["progress"] = True
    return config


def health_stop(end: dict | None) -> str | None:
    """The stop reason (``collapsed:<mode>`` / ``stalled``) when the trainer's ``end`` record says its health monitor
    stopped it (``train.health=stop``), else None. The record, not the exit code: under torchrun every worker
    failure is torchrun's exit code 1."""
    status = str((end or {}).get("status") or "")
    return status if status.startswith("collapsed:") or status == "stalled" else None


class TrainerFailed(RuntimeError):
    """The trainer exited non-zero; the message carries its own last error lines."""

    #: Whether a retry may help (a killed or crashed trainer: yes; a collapse: no).
    retriable = True
    #: The MLflow run's ``stop_reason`` for this end.
    stop_reason = "failed"


class TrainerCollapsed(TrainerFailed):
    """``train.health=stop`` ended the training after a checkpoint (:func:`health_stop`); a retry would collapse
    again, so nothing retries or requeues it. ``stop_reason``: ``collapsed:<mode>`` or ``stalled``."""

    retriable = False

    def __init__(self, message: str, stop_reason: str):
        super().__init__(message)
        self.stop_reason = stop_reason


class TrainerStopped(BaseException):
    """This process got SIGTERM while nothing else handled it (no Prefect engine around): raised once the trainer
    has stopped. A BaseException, like KeyboardInterrupt: a stop is no failure, and nothing retries it."""

    def __init__(self, signum: int):
        self.signal = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def run_trainer(
    cmd: list[str],
    env: dict[str, str],
    on_line: Callable[[str], None],
    on_progress: Callable[[dict], None],
    grace_s: float | None = None,
    tail_lines: int = 40,
    on_stop: Callable[[int, dict | None], None] | None = None,
) -> dict | None:
    """Run ``cmd``, feeding each output line to ``on_line`` and each progress record to ``on_progress``.

    Returns the trainer's last ``end`` progress record. Raises :class:`TrainerFailed` with the trainer's last lines
    when it exits non-zero, :class:`TrainerCollapsed` (never retried) when its health monitor stopped it.

    A stop request here — the exception a signal handler raises in the main thread while it waits: Prefect's
    termination signal, KeyboardInterrupt, :class:`TrainerStopped` for a SIGTERM nothing else handles — stops the
    trainer cleanly (see the module docstring: one SIGTERM to torchrun, then its output is followed until it
    exits), calls ``on_stop(signum, end_record)`` and re-raises, so the stop takes its usual course (Prefect:
    Cancelled or Crashed, never a retry). Prefect's own SIGTERM handler stays installed: it is how a cancellation
    is told apart from a crash. A second SIGINT meanwhile abandons the checkpoint (everything under torchrun is
    killed); a repeated SIGTERM changes nothing. ``grace_s``: how long after the stop request everything under
    torchrun is killed (default: torchrun's ``--shutdown-timeout`` plus 30 s).
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    records: dict[str, dict] = {}
    if grace_s is None:
        grace_s = _shutdown_timeout(cmd) + 30.0
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1", PARENT_DEATH_ENV: "SIGTERM"},
        text=True,
        bufsize=1,
        # Own session: signals sent to this process's group reach torchrun only as forwarded below, once.
        start_new_session=True,
        # SIGTERM to torchrun if this process dies (this thread waits for the child, so it outlives it).
        preexec_fn=functools.partial(exit_with_parent, signal.SIGTERM, os.getpid()),
    )

    def follow(line: str) -> None:
        record = parse_progress_line(line)
        if record is None:
            tail.append(line)
            on_line(line)
            return
        if record.get("event") in ("end", "error"):
            records[record["event"]] = record
        on_progress(record)

    restore = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        restore = signal.signal(signal.SIGTERM, _raise_trainer_stopped)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            follow(raw.rstrip("\n"))
        code = proc.wait()
    except BaseException as stop:
        signum = getattr(stop, "signal", None) or (signal.SIGINT if isinstance(stop, KeyboardInterrupt) else None)

        def follow_stop(line: str) -> None:
            # After the trainer's end record comes torchrun's report of the signal it passed on (a traceback of
            # its SignalException): expected, so kept for the error message only, not logged as if it were news.
            if "end" in records and parse_progress_line(line) is None:
                tail.append(line)
            else:
                follow(line)

        _stop_and_follow(proc, follow_stop, grace_s)
        if signum is not None and on_stop is not None:
            on_stop(int(signum), records.get("end"))
        raise
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    if code != 0:
        raise _failure(code, records, tail)
    return records.get("end")


def _failure(code: int, records: dict[str, dict], tail) -> TrainerFailed:
    """Why the trainer exited ``code`` (non-zero): a health stop, or a failure with its last error lines."""
    if health_stop(records.get("end")):
        return collapsed_error(records["end"], tail)
    reason = (records.get("error") or {}).get("message") or last_error(tail) or f"exit code {code}"
    return TrainerFailed(f"trainer failed (exit code {code}): {reason}\n--- last trainer output ---\n" + "\n".join(tail))


def collapsed_error(end: dict, tail) -> TrainerCollapsed:
    """The :class:`TrainerCollapsed` of a trainer whose ``end`` record says its health monitor stopped it."""
    reason = health_stop(end) or "collapsed"
    detail = (end.get("health") or {}).get("reason") or last_error(tail)
    return TrainerCollapsed(f"training stopped by its health monitor at step {end.get('step', '?')}: {reason} "
                            f"(train.health=stop){': ' + detail if detail else ''}; checkpoint: "
                            f"{end.get('checkpoint') or 'none'}. Not retried: a retry would collapse again. Change the "
                            "recipe (docs/training-health.md), then resume from the checkpoint.", reason)


def _raise_trainer_stopped(signum, _frame):
    raise TrainerStopped(signum)


def _stop_and_follow(proc: subprocess.Popen, follow: Callable[[str], None], grace_s: float) -> None:
    """SIGTERM to ``proc`` (torchrun), then its output followed to the end; everything under it is killed after
    ``grace_s``, or at once on a SIGINT meanwhile (an impatient second Ctrl-C); a repeated SIGTERM changes nothing."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    killer = threading.Timer(grace_s, _kill_tree, args=(proc,))
    killer.daemon = True
    killer.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: None)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: _kill_tree(proc))
    try:
        for raw in proc.stdout:
            follow(raw.rstrip("\n"))
        proc.wait()
    finally:
        killer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _shutdown_timeout(cmd: list[str]) -> float:
    for arg in cmd:
        if arg.startswith("--shutdown-timeout="):
            return float(arg.split("=", 1)[1])
    return 30.0  # torchrun's own default


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it (the last resort for a trainer that ignores SIGTERM)."""
    try:
        victims = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        victims = []
    for p in [*victims]:
        try:
            p.kill()
        except psutil.Error:
            pass
    if proc.poll() is None:
        proc.kill()


def last_error(lines) -> str:
    """The most telling line of a Python traceback in the trainer's output."""
    for line in reversed(lines):
        text = line.split("]:", 1)[-1].strip()  # torchrun prefixes worker lines with "[rank0]:"
        if text and ("Error" in text or "Exception" in text) and not text.startswith("File "):
            return text
    return ""

"""Launch ``torchrun -m dino_model.train`` as a child process and follow it (no Prefect here: the task wraps it).

The same launcher runs other torchrun entry points (``module=``), e.g. the multi-process feature extraction
``torchrun -m dino_model.eval.extract`` of the ``extract-features`` task.

torch.distributed stays out of the orchestrating process: the trainer runs in its own process group of workers
started by torchrun. This module builds the command line, streams the child's output line by line to a callback
(the Prefect task forwards it to the flow-run logs and turns ``DINO_PROGRESS`` lines into a progress artifact) and
keeps the last lines for the error message.

Stopping. The trainer never outlives this process:

* SIGTERM / SIGINT here (Prefect cancelling the flow run, Ctrl-C in ``dino pretrain``) is forwarded once, as
  SIGTERM, to torchrun, which passes it to its workers; the trainer finishes its step, writes a checkpoint and
  exits; then the signal takes its usual course here (Prefect's handler: the flow run ends Cancelled or Crashed),
  so a stop is never mistaken for a failure to retry. torchrun runs in its own session, so a signal sent to this
  process's group reaches the trainer only through this path, once.
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


class TrainerFailed(RuntimeError):
    """The trainer exited non-zero; the message carries its own last error lines."""


class TrainerStopped(BaseException):
    """The trainer stopped because this process was asked to stop (a BaseException, like KeyboardInterrupt: a
    stop is no failure, and nothing retries it). Raised when the signal's own handler here does not raise."""

    def __init__(self, signum: int, end: dict | None):
        self.signum = signum
        self.end = end
        step = (end or {}).get("step", "?")
        super().__init__(f"trainer stopped by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint: {(end or {}).get('checkpoint') or 'none'}")


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
    when it exits non-zero. When this process gets SIGTERM / SIGINT meanwhile (see the module docstring), the
    trainer is stopped cleanly, ``on_stop(signum, end_record)`` is called, then the signal's previous handler runs
    (Prefect's raises its termination exception, Python's default SIGINT handler ``KeyboardInterrupt``); if it
    does not raise, :class:`TrainerStopped` is raised. ``grace_s``: how long after the stop request torchrun and
    everything under it is killed (default: torchrun's ``--shutdown-timeout`` plus 30 s).
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    end_record: dict | None = None
    error_record: dict | None = None
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
    stop_signal: list[int] = []

    def request_stop(signum, _frame):
        if stop_signal or proc.poll() is not None:
            return  # already stopping: the trainer is finishing its step and checkpoint
        stop_signal.append(signum)
        proc.send_signal(signal.SIGTERM)
        killer = threading.Timer(grace_s, _kill_tree, args=(proc,))
        killer.daemon = True
        killer.start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, request_stop)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            record = parse_progress_line(line)
            if record is None:
                tail.append(line)
                on_line(line)
                continue
            if record.get("event") == "end":
                end_record = record
            elif record.get("event") == "error":
                error_record = record
            on_progress(record)
        code = proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop_signal:
        signum = stop_signal[0]
        if on_stop is not None:
            on_stop(signum, end_record)
        handler = previous.get(signum)
        if callable(handler):
            handler(signum, None)
        raise TrainerStopped(signum, end_record)
    if code != 0:
        reason = (error_record or {}).get("message") or _last_error(tail) or f"exit code {code}"
        raise TrainerFailed(f"trainer failed (exit code {code}): {reason}\n--- last trainer output ---\n" + "\n".join(tail))
    return end_record


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


def _last_error(lines) -> str:
    """The most telling line of a Python traceback in the trainer's output."""
    for line in reversed(lines):
        text = line.split("]:", 1)[-1].strip()  # torchrun prefixes worker lines with "[rank0]:"
        if text and ("Error" in text or "Exception" in text) and not text.startswith("File "):
            return text
    return ""

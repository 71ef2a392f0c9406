"""Launch ``torchrun -m dino_model.train`` as a child process and follow it (no Prefect here: the task wraps it).

The same launcher runs other torchrun entry points (``module=``), e.g. the multi-process feature extraction
``torchrun -m dino_model.eval.extract`` of the ``extract-features`` task.

torch.distributed stays out of the orchestrating process: the trainer runs in its own process group of workers
started by torchrun. This module builds the command line, streams the child's output line by line to a callback
(the Prefect task forwards it to the flow-run logs and turns ``DINO_PROGRESS`` lines into a progress artifact),
keeps the last lines for the error message, and forwards SIGTERM/SIGINT so cancelling the flow stops the trainer
cleanly (torchrun passes the signal to its workers; the trainer finishes or abandons the step and never leaves a
half-written checkpoint). A trainer that ignores it is killed after a grace period.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

from dino_model.metrics import parse_progress_line


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

    def validate(self) -> None:
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be >= 1, got {self.nnodes}")
        if self.nnodes > 1 and ":" not in self.rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint must be HOST:PORT when nnodes > 1, got {self.rdzv_endpoint!r}")


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
    cmd += ["--max-restarts=0", "-m", module]
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


def run_trainer(
    cmd: list[str],
    env: dict[str, str],
    on_line: Callable[[str], None],
    on_progress: Callable[[dict], None],
    grace_s: float = 60.0,
    tail_lines: int = 40,
) -> dict | None:
    """Run ``cmd``, feeding each output line to ``on_line`` and each progress record to ``on_progress``.

    Returns the trainer's last ``end`` progress record. Raises :class:`TrainerFailed` with the trainer's last lines
    when it exits non-zero.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    end_record: dict | None = None
    error_record: dict | None = None
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        text=True,
        bufsize=1,
    )

    def forward(signum, _frame):
        # Pass cancellation on to torchrun (it signals its workers), then make sure it really ends.
        if proc.poll() is None:
            proc.send_signal(signum)
            threading.Timer(grace_s, lambda: proc.poll() is None and proc.kill()).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, forward)
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
                proc.kill()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        reason = (error_record or {}).get("message") or last_error(tail) or f"exit code {code}"
        raise TrainerFailed(f"trainer failed (exit code {code}): {reason}\n--- last trainer output ---\n" + "\n".join(tail))
    return end_record


def last_error(lines) -> str:
    """The most telling line of a Python traceback in the trainer's output."""
    for line in reversed(lines):
        text = line.split("]:", 1)[-1].strip()  # torchrun prefixes worker lines with "[rank0]:"
        if text and ("Error" in text or "Exception" in text) and not text.startswith("File "):
            return text
    return ""

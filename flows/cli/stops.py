"""How a ``dino`` command stops on a signal: SIGTERM (``kill PID``, a service manager's stop), SIGHUP (the terminal or
SSH session closes) and SIGINT (Ctrl-C) are all an ordinary stop.

While a command runs, each of them raises :class:`CommandStopped` in its main thread, which unwinds the command the
way an error would: a trainer it launched is sent SIGTERM and writes its checkpoint
(:func:`tasks.pretrain.trainer_process.run_trainer`), the MLflow run ends KILLED with ``stop_reason`` naming the
signal (``signal:SIGHUP``), the flow run ends Crashed with the signal in its message (SIGTERM: Prefect's own
``TerminationSignal`` path, which hands the signal on to this handler once the flow run is recorded), the command's
Prefect server and task-runner workers are stopped, and the command prints one line saying how to resume and exits
with ``128 + signal`` (129 for SIGHUP, 130 for SIGINT, 143 for SIGTERM), as the shell reports a process a signal
ended. SIGKILL cannot be handled; the command's children notice its death themselves (``PR_SET_PDEATHSIG``:
the Prefect server, the trainer chain, the Dask and process-pool workers).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

__all__ = ["STOP_SIGNALS", "CommandStopped", "stop_signals", "exit_status"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class CommandStopped(BaseException):
    """A stop signal reached the command. A BaseException, like KeyboardInterrupt: a stop is not a failure, and no
    task retries it. ``signal`` is what :func:`tasks.pretrain.trainer_process.run_trainer` forwards a stop by."""

    def __init__(self, signum: int):
        self.signal = int(signum)
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name}")


def _raise_stopped(signum: int, _frame) -> None:
    raise CommandStopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGINT raise :class:`CommandStopped` in the main thread within the block."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_status(stopped: CommandStopped) -> int:
    """The exit status of a command a signal stopped: 128 + the signal's number (the shell's convention)."""
    return 128 + stopped.signal

"""Tie a process's life to its parent's: when the parent dies, for any reason (SIGKILL and OOM kills included), the
kernel sends this process a chosen signal (Linux ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing happens).

A launcher that must never leave its trainer running without it (the pretrain flow's ``torchrun``) uses it twice:

* in the ``preexec_fn`` of the ``torchrun`` child::

      subprocess.Popen(cmd, preexec_fn=lambda: exit_with_parent(signal.SIGTERM, expected_parent=launcher_pid))

* in each trainer process ``torchrun`` starts, through the environment (``torchrun`` passes it on)::

      DINO_PARENT_DEATH_SIGNAL=SIGTERM torchrun ... -m dino_model.train ...   # main() calls exit_with_parent_from_env()

so a SIGTERM reaches the trainer whether the launcher or ``torchrun`` dies; the trainer then finishes its step,
writes its checkpoint and exits (see :mod:`dino_model.train`). The kernel sends the signal when the *thread* that
started the child ends, so start children from a thread that outlives them (a launcher that waits for its child).

A launcher that reads the trainer's output through a pipe takes the pipe's only reader with it when it dies: from
then on every write to stdout / stderr fails (EPIPE). :func:`exit_with_parent_from_env` therefore also makes this
process drop such writes instead of failing on them — a progress line must not cost the checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, TextIO

__all__ = ["ENV_VAR", "exit_with_parent", "exit_with_parent_from_env", "drop_output_without_reader"]

#: Environment variable naming the signal (``SIGTERM``, ``TERM`` or a number) a process asks for at start.
ENV_VAR = "DINO_PARENT_DEATH_SIGNAL"

_PR_SET_PDEATHSIG = 1


def _load_prctl():
    # Resolved once, at import, in the launcher: a preexec_fn runs between fork and exec in a process that may have
    # other threads, where loading a library could deadlock on a lock one of them held.
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


def exit_with_parent(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies. Returns whether it could (Linux only).

    ``expected_parent``: the parent's pid as the caller knows it (a launcher passes its own pid to its child's
    ``preexec_fn``). If the parent is no longer that process — it died between the fork and this call, and the
    process was handed to init or a subreaper — ``sig`` is sent at once, since the kernel never will. Without it the
    parent is whoever it is now (a process started by a parent that is already gone cannot tell)."""
    if _prctl is None:
        return False
    parent = os.getppid() if expected_parent is None else expected_parent
    if _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), int(sig))
    return True


def exit_with_parent_from_env(environ: dict[str, str] | None = None) -> bool:
    """:func:`exit_with_parent` with the signal named by ``DINO_PARENT_DEATH_SIGNAL``; nothing when it is unset.
    Raises ``ValueError`` naming the variable when its value is not a signal."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not value:
        return False
    sig = parse_signal(value)
    drop_output_without_reader()
    return exit_with_parent(sig)


class _ReaderlessSafeStream:
    """A text stream that passes writes on until its reader is gone (EPIPE), then drops them."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._reader_gone = False

    def write(self, text: str) -> int:
        if not self._reader_gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: the stream itself was closed
                self._reader_gone = True
        return len(text)

    def flush(self) -> None:
        if not self._reader_gone:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._reader_gone = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def drop_output_without_reader() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` drop writes once nobody reads them (see the module docstring)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ReaderlessSafeStream):
            setattr(sys, name, _ReaderlessSafeStream(stream))


def parse_signal(value: str) -> signal.Signals:
    """``SIGTERM``, ``TERM`` or ``15`` -> ``signal.SIGTERM``."""
    try:
        return signal.Signals(int(value)) if value.isdigit() else signal.Signals[
            value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()]
    except (KeyError, ValueError):
        raise ValueError(f"{ENV_VAR} must name a signal such as SIGTERM, got {value!r}") from None

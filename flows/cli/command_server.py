"""The Prefect API server a ``dino`` command runs its flows on when no ``PREFECT_API_URL`` is set.

Prefect would start a temporary server of its own on first use (``prefect.server.api.server.SubprocessASGIServer``)
and stop it from an ``atexit`` hook, which never runs when the command is killed (SIGKILL, the OOM killer): the
server (a ``uvicorn`` process of ~300 MB) would stay behind, orphaned. So the command starts the same server app
itself, as a child that the kernel stops when the command dies (``PR_SET_PDEATHSIG``, set between fork and exec:
:mod:`dino_model.parent_death`), and points Prefect at it (``PREFECT_API_URL``, for this process and every worker
process it starts). It stops the server itself on the way out, after the last events are recorded
(:func:`flows.cli.prefect_session.settle_server`).

The server is the one Prefect's temporary server runs — ``uvicorn --factory prefect.server.api.server:create_app``
with the temporary server's settings (no UI, the ephemeral mode), the user's ``PREFECT_HOME`` database — on a free
port of 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

__all__ = ["CommandServer", "command_server"]

#: Environment of the server process: what Prefect's own temporary server sets (no UI, the ephemeral mode).
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CommandServer:
    """A Prefect API server process tied to this process's life (see the module docstring)."""

    def __init__(self, timeout: float | None = None):
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.timeout = timeout if timeout is not None else float(
            os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        self.process: subprocess.Popen | None = None
        self.log_path = ""

    def start(self) -> None:
        """Start the server and wait until it answers ``/health``; a ``RuntimeError`` with its output otherwise."""
        import prefect
        from prefect.settings import get_current_settings

        from dino_model.parent_death import exit_with_parent

        settings = get_current_settings()
        settings_env = settings.to_environment_variables(exclude_unset=True)
        settings_env.pop("PREFECT_API_URL", None)
        # Its output (at most errors) goes to a file, never to a pipe nobody reads while the command runs.
        self.log_path = os.path.join(str(settings.home), "dino-command-server.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                cmd, env={**os.environ, **settings_env, **SERVER_ENV}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
                # The kernel stops the server when this command dies, whatever kills it (the main thread starts
                # it and outlives it: PR_SET_PDEATHSIG follows the starting thread).
                preexec_fn=functools.partial(exit_with_parent, signal.SIGTERM, os.getpid()),
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(self.log_path) as log:
                    output = log.read().strip()[-2000:]
                raise RuntimeError(f"the Prefect API server exited with code {self.process.returncode}: {output}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the Prefect API server did not answer on {self.api_url} within {self.timeout:.0f} s "
                           "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def command_server() -> Iterator[CommandServer | None]:
    """A :class:`CommandServer` for the block, Prefect pointed at it (this process's settings and environment, so
    worker processes use it too); None when ``PREFECT_API_URL`` names a server of the user's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL"):
        yield None
        return
    server = CommandServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()

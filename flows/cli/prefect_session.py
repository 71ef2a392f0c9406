"""How a ``dino`` command runs its flows on Prefect: :func:`flow_session` around the flow calls.

Three things it takes care of:

**No traceback for an error the command reports itself.** When a flow fails on bad input (a model version that
does not exist, a source folder that holds no image...), Prefect logs the exception with its
traceback from the task run and again from the flow run, then the command prints the same message as
``dino <cmd>: error: ...``. Unless ``--debug``, those Prefect records are dropped for the exception types the
command reports (and only for them): everything else Prefect logs is shown as usual.

**A server of the command's own, stopped cleanly.** Without ``PREFECT_API_URL``, the command runs its flows on a
Prefect API server it starts itself and that dies with it, whatever kills it (:mod:`flows.cli.command_server`:
Prefect's own temporary server would outlive a killed command). It is stopped on the way out, once it has recorded
everything: the server's task-run recorder (``prefect.server.services.task_run_recorder``) may still be writing the
client's last events to its sqlite database, and a shutdown in the middle cancels the write (the recorder logs
``Error flushing N events`` with an ``asyncio.CancelledError`` traceback although nothing is lost; seen in 1 run in
4 of ``dino shard`` on a fully loaded 2-core machine). So when the flows return (or a stop signal unwinds them),
:func:`settle_server` delivers the client's pending events and logs, then waits until the server has recorded a
final state for every task run of the flows this command ran, and only then is the server stopped.

**Dask's INFO lines off the terminal.** A ``--task-runner dask`` run starts and stops a local cluster, and Dask
logs each worker joining and leaving at INFO, through the progress bar: only WARNING and above unless ``--debug``
(or the user's own ``DASK_LOGGING__DISTRIBUTED``); set before Dask is imported, the cluster's processes inherit it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import datetime, timezone
from typing import Iterator

#: Prefect's loggers of flow and task runs: where the engines log a run's exception with its traceback.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
_FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
_UNFINISHED_STATES = ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING")


class ReportedErrors(logging.Filter):
    """Drops Prefect run-log records about an exception the command reports itself: records carrying it
    (``exc_info``), and the engines' ``Finished in state Failed(...)`` summaries that name it."""

    def __init__(self, reported: tuple[type[BaseException], ...]):
        super().__init__()
        self.reported = reported
        self.names = tuple(sorted({c.__name__ for cls in reported for c in _with_subclasses(cls)}))

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return not isinstance(exc, self.reported)
        message = record.getMessage()
        if "Finished in state Failed" in message:
            return not any(f"{name}:" in message or f"{name}(" in message for name in self.names)
        return True


def _with_subclasses(cls: type) -> list[type]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _with_subclasses(sub)]


@contextlib.contextmanager
def flow_session(reported: tuple[type[BaseException], ...] = (), debug: bool = False) -> Iterator[None]:
    """Run flows inside: Prefect's logs of the ``reported`` exceptions are dropped and Dask logs only warnings
    (unless ``debug``); without ``PREFECT_API_URL`` the flows run on the command's own server
    (:func:`flows.cli.command_server.command_server`), left with nothing in flight and stopped on the way out
    (:func:`settle_server`)."""
    from .command_server import command_server

    started = datetime.now(timezone.utc)
    if not debug:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    quiet = ReportedErrors(reported) if reported and not debug else None
    loggers = [logging.getLogger(name) for name in RUN_LOGGERS]
    for logger in loggers if quiet else ():
        logger.addFilter(quiet)
    try:
        with command_server() as server:
            try:
                yield
            finally:
                if server is not None:
                    settle_server(started)
    finally:
        for logger in loggers if quiet else ():
            logger.removeFilter(quiet)


def settle_server(since: datetime, timeout: float = 30.0) -> bool:
    """Before the command stops its own server: send the client's pending events and logs, then wait (at most
    ``timeout`` seconds) until the server has recorded every task run of the flow runs that started at or after
    ``since`` and have finished, each in a final state, with the count unchanged between two looks (a task run whose
    first event is still queued is not in the database yet). Returns whether it settled."""
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    deadline = time.monotonic() + timeout
    EventsWorker.drain_all(timeout=timeout)
    APILogWorker.drain_all(timeout=max(1.0, deadline - time.monotonic()))
    ours = {"start_time": {"after_": since.isoformat()}, "state": {"type": {"any_": list(_FINAL_STATES)}}}
    previous = None
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            total = count_task_runs(client, ours)
            unfinished = count_task_runs(client, ours, {"state": {"type": {"any_": list(_UNFINISHED_STATES)}}})
            if unfinished == 0 and total == previous:
                return True
            previous = total if unfinished == 0 else None
            time.sleep(0.25)
    return False


def count_task_runs(client, flow_runs: dict, task_runs: dict | None = None) -> int:
    """How many task runs the Prefect API has recorded for the flow runs matching the ``flow_runs`` filter (and
    ``task_runs``, e.g. a state filter), through ``client`` (a sync Prefect client)."""
    response = client.request("POST", "/task_runs/count", json={"flow_runs": flow_runs, "task_runs": task_runs})
    response.raise_for_status()
    return int(response.json())

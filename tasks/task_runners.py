"""The Prefect task runner behind a ``task_runner`` choice (see :mod:`tasks.validation.task_runners`), opened by the
flows that fan tasks out: ``dino-shard`` (one task per shard range) and the feature extraction of ``dino-extract``
and ``dino-evaluate`` (one task per sample range).

    with open_task_runner("dask", workers=4) as runner:          # a local Dask cluster of 4 worker processes
        futures = [runner.submit(write_shard_task, parameters) for parameters in ...]

Every runner is Prefect's or prefect-dask's own — ``ThreadPoolTaskRunner``, ``ProcessPoolTaskRunner``,
``DaskTaskRunner`` — so concurrency, task retries and task-run records are Prefect's; ``runner.submit`` is what
``task.submit`` calls on the flow's runner, used here on the runner the flow run chose. A Dask scheduler also
reruns the tasks of a worker that dies on another worker: the tasks submitted here write atomically and
idempotently, so a rerun is safe.

Worker processes report their task runs to the flow's Prefect API: ``PREFECT_API_URL`` when set (their own
environment must reach it too), else the temporary server of the flow's process, whose address is handed to them
(:func:`worker_api_url`); a remote Dask cluster then needs workers on this machine or a Prefect server of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Iterator

from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from dino_model.parent_death import exit_with_parent
from tasks.validation.task_runners import LOOPBACK_HOSTS, check_parallelism, check_task_runner, scheduler_address

logger = logging.getLogger(__name__)


def build_task_runner(task_runner: str, workers: int) -> TaskRunner:
    """The (not yet started) runner of ``task_runner`` with ``workers`` threads / processes / local Dask workers;
    a ``tcp://`` scheduler brings its own workers."""
    check_task_runner(task_runner)
    check_parallelism(workers, "workers")
    if task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if task_runner == "processes":
        # Each worker stops when this process dies, whatever kills it: a killed command leaves none behind.
        return ProcessPoolTaskRunner(max_workers=workers, initializer=exit_with_parent,
                                     initargs=(signal.SIGTERM, os.getpid()))
    from prefect_dask import DaskTaskRunner

    if task_runner == "dask":
        # One single-threaded worker process per slot (the work is CPU-bound Python: threads would share a GIL);
        # no dashboard (it would take a port and import bokeh).
        # Each worker stops when this process dies, whatever kills it (tasks/dask_worker.py).
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "dashboard_address": None, "preload": ["tasks.dask_worker"]})
    return DaskTaskRunner(address=task_runner)


def worker_api_url(task_runner: str) -> str | None:
    """The Prefect API address worker processes must use when this process runs on Prefect's temporary server
    (no ``PREFECT_API_URL``): without it, each worker process would start a temporary server of its own and record
    its task runs there. None when ``PREFECT_API_URL`` is set (workers read the same setting) or for threads."""
    if task_runner == "threads" or PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running:
        return None
    address = scheduler_address(task_runner)
    if address is not None and address[0] not in LOOPBACK_HOSTS:
        logger.warning("the Dask scheduler %s is not on this machine but Prefect runs on a temporary server at %s "
                       "that only this machine reaches: set PREFECT_API_URL to a Prefect server the Dask workers "
                       "reach (docs/operator-guide.md, 'Sharding and extraction on Dask')", task_runner, server.api_url)
    return server.api_url


@contextlib.contextmanager
def open_task_runner(task_runner: str, workers: int) -> Iterator[TaskRunner]:
    """Start the runner of ``task_runner`` (see :func:`build_task_runner`), yield it, and shut it down (a local
    Dask cluster with it) on the way out. Call it inside a flow run: the tasks submitted are that run's."""
    runner = build_task_runner(task_runner, workers)
    api_url = worker_api_url(task_runner)
    with contextlib.ExitStack() as stack:
        if api_url is not None:
            # Serialised into each task's context (Dask) and environment (processes): the workers' API address.
            stack.enter_context(temporary_settings({PREFECT_API_URL: api_url}))
        yield stack.enter_context(runner)


def worker_slots(runner: TaskRunner, workers: int) -> int:
    """How many tasks ``runner`` runs at once: the threads of a connected Dask cluster's workers (at least one),
    else ``workers``."""
    client = getattr(runner, "client", None)
    if client is None:
        return workers
    return max(1, sum(client.nthreads().values()))

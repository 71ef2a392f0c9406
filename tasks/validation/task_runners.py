"""The ``task_runner`` choice of ``dino-shard``, ``dino-extract`` and ``dino-evaluate``: where their parallel tasks
run. One spelling everywhere — the ``--task-runner`` option, the flows' ``task_runner`` parameter, ``prefect.yaml``:

==================  ==================================================================================
``threads``         threads of the flow's process (Prefect's ``ThreadPoolTaskRunner``): the default
``processes``       worker processes on the flow's machine (Prefect's ``ProcessPoolTaskRunner``): no GIL
``dask``            a local Dask cluster of ``parallelism`` worker processes (``prefect-dask``)
``slurm``           ``parallelism`` Dask workers, each a Slurm job of the cluster this machine submits to
                    (``dask-jobqueue``; its ``jobqueue.slurm`` configuration: :mod:`tasks.slurm_dask`)
``tcp://HOST:PORT`` a running Dask scheduler (``dask scheduler``), its workers anywhere (``prefect-dask``)
==================  ==================================================================================

Prefect-free (like all of :mod:`tasks.validation`): the ``dino`` command checks the choice before Prefect starts;
:mod:`tasks.task_runners` builds the runner.
"""

from __future__ import annotations

import re

from .errors import UserInputError

#: The named choices; a ``tcp://HOST:PORT`` address is the fifth kind.
TASK_RUNNERS = ("threads", "processes", "dask", "slurm")
_SCHEDULER = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")
#: Where a scheduler address is also on this machine (a temporary Prefect server is reachable from its workers).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class TaskRunnerError(UserInputError):
    """A ``task_runner`` value that is none of the choices; the message lists them."""


def check_task_runner(value: object, field: str = "task_runner") -> str:
    """``value`` if it is ``threads``, ``processes``, ``dask`` or ``tcp://HOST:PORT``; else a
    :class:`TaskRunnerError` naming ``field`` and the choices."""
    if isinstance(value, str) and (value in TASK_RUNNERS or scheduler_address(value) is not None):
        return value
    raise TaskRunnerError(f"{field} must be one of {', '.join(TASK_RUNNERS)} or the address of a running Dask "
                          f"scheduler tcp://HOST:PORT (e.g. tcp://127.0.0.1:8786), got {value!r}")


def scheduler_address(value: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp://HOST:PORT`` value, else None."""
    m = _SCHEDULER.match(value)
    if m is None or not 1 <= int(m.group("port")) <= 65535:
        return None
    return m.group("host"), int(m.group("port"))


def runs_in_flow_process(task_runner: str) -> bool:
    """Whether tasks run in the flow's own process (``threads``): in-process listeners (the CLI's progress bar)
    then see each task's progress; elsewhere only the flow's record of finished tasks reaches them."""
    return task_runner == "threads"


def check_parallelism(value: object, field: str = "parallelism") -> int:
    """A positive number of workers, else a :class:`UserInputError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserInputError(f"{field} must be a positive integer (workers of the task runner), got {value!r}")
    return value


def check_extraction_runner(task_runner: object, parallelism: object, nproc_per_node: int,
                            prefix: str = "") -> str:
    """The task runner of a feature extraction: a valid choice with a valid worker count, and not combined with
    ``nproc_per_node > 1`` (torchrun's processes on this machine's GPUs are the other way to parallelise it).
    ``prefix`` names the fields as the caller spells them (``--`` for the command line)."""
    option = (lambda name: f"--{name.replace('_', '-')}") if prefix == "--" else (lambda name: name)
    check_task_runner(task_runner, option("task_runner"))
    check_parallelism(parallelism, option("parallelism"))
    if nproc_per_node > 1 and task_runner != "threads":
        raise UserInputError(f"{option('nproc_per_node')} {nproc_per_node} and {option('task_runner')} "
                             f"{task_runner} are two ways to run the extraction in parallel: use torchrun processes "
                             f"(one per GPU of this machine) or the task runner's workers, not both")
    return task_runner  # type: ignore[return-value]

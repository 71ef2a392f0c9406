"""``--task-runner slurm``: the data stages' Dask workers as Slurm jobs (``dask-jobqueue``'s ``SLURMCluster`` behind
prefect-dask's ``DaskTaskRunner``), for ``dino-shard``, ``dino-extract`` and ``dino-evaluate``'s extraction.

    dino shard /shared/imagenet/train /shared/shards/in1k-train --task-runner slurm --parallelism 8

``parallelism`` is the number of worker jobs (one single-threaded worker process each). Everything else a
cluster needs comes from dask-jobqueue's own configuration, section ``jobqueue.slurm``
(``~/.config/dask/jobqueue.yaml``, or ``DASK_JOBQUEUE__SLURM__<KEY>`` variables): ``queue`` (the partition),
``account``, ``walltime``, ``cores``, ``memory``, ``job-script-prologue`` (module loads, an environment activated),
``job-extra-directives``, ``log-directory``, ``interface`` / ``scheduler-options``. Defaults here where it sets
none: 1 core and 4 GiB per job, job logs in ``~/.cache/dino/slurm/dask``, and the scheduler (in the flow's process)
listening on this machine's own address — on 127.0.0.1 when every node of the cluster is this machine. The
workers report their task runs to the flow's Prefect API, so on a real cluster set ``PREFECT_API_URL`` to a server
the nodes reach (docs/operator-guide.md, "A Slurm cluster").
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

logger = logging.getLogger(__name__)

#: dask-jobqueue's configuration section for Slurm.
SECTION = "jobqueue.slurm"


def slurm_cluster_kwargs() -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments: this project's defaults for what ``jobqueue.slurm`` leaves unset."""
    import dask

    from tasks.pretrain.slurm.commands import single_host_cluster

    def unset(key: str) -> bool:
        return dask.config.get(f"{SECTION}.{key}", None) in (None, "", [], {})

    kwargs: dict[str, Any] = {"processes": 1}
    if unset("cores"):
        kwargs["cores"] = 1
    if unset("memory"):
        kwargs["memory"] = "4GiB"
    if unset("log-directory"):
        kwargs["log_directory"] = os.path.expanduser("~/.cache/dino/slurm/dask")
    options = dict(dask.config.get(f"{SECTION}.scheduler-options", {}) or {})
    options.setdefault("dashboard_address", None)  # no web server nobody asked for
    if unset("interface") and "host" not in options and "interface" not in options:
        options["host"] = "127.0.0.1" if single_host_cluster() else _own_address()
    kwargs["scheduler_options"] = options
    return kwargs


def _own_address() -> str:
    """This machine's address as the cluster knows it (its hostname resolved): where the nodes reach the
    scheduler."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        logger.warning("cannot resolve this machine's name: set %s.interface or %s.scheduler-options.host so that "
                       "the Slurm nodes reach the Dask scheduler", SECTION, SECTION)
        return "127.0.0.1"

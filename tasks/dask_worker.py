"""Preloaded into every worker of the local Dask cluster that ``--task-runner dask`` starts
(:func:`tasks.task_runners.build_task_runner`): the worker stops when the process that started the cluster dies,
whatever kills it — SIGKILL and the OOM killer included (``PR_SET_PDEATHSIG``, :mod:`dino_model.parent_death`).
Without it, a killed ``dino shard --task-runner dask`` would leave its worker processes behind, waiting for a
scheduler that is gone."""

from __future__ import annotations

import os
import signal

from dino_model.parent_death import exit_with_parent


def dask_setup(worker) -> None:
    """Called by Dask in the worker process at start (``preload``)."""
    if os.getppid() == 1:  # the cluster's process is already gone: nobody will ever send the signal
        os.kill(os.getpid(), signal.SIGTERM)
    exit_with_parent(signal.SIGTERM)

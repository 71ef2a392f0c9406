"""In-process listeners: how a command-line front end (``dino ...``) follows a task it runs in the same process.

Prefect tasks log to the flow run; a terminal user wants a progress bar instead. A task calls ``emit(...)`` on a
:class:`Listeners` registry; the CLI adds a callback before running the flow and removes it after. Thread-safe,
since Prefect may run tasks on worker threads.

A task that runs in another process (Prefect's process pool, a Dask worker) is pickled with the registry it calls:
the copy it gets has no callbacks (they belong to the process that added them), so its ``emit`` reaches nobody and
the flow reports that task's progress itself once it finishes.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class Listeners:
    """A thread-safe list of callbacks, all called by :meth:`emit`."""

    def __init__(self) -> None:
        self._fns: list[Callable[..., None]] = []
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}  # callbacks and the lock stay in this process

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def add(self, fn: Callable[..., None]) -> None:
        with self._lock:
            self._fns.append(fn)

    def remove(self, fn: Callable[..., None]) -> None:
        with self._lock:
            if fn in self._fns:
                self._fns.remove(fn)

    def emit(self, *args: Any) -> None:
        with self._lock:
            fns = list(self._fns)
        for fn in fns:
            fn(*args)

"""Prepare the next batches on the device while the current step runs: a background thread and a side CUDA stream.

Without it the training loop does, per step, ``crops = prepare(batch)`` then ``train_step(crops)`` on one CUDA
stream: the GPU runs decode + augment (or the host-to-device copy of CPU-made crops) and *then* the step, and the
CPU spends the decode's host-side work (nvjpeg's Huffman stage runs on the host for most JPEGs, plus the Python of
the augmentation) before it can queue the step. :class:`DevicePrefetcher` moves ``prepare`` to a daemon thread
that runs it on its own CUDA stream, ``depth`` batches ahead:

* on the GPU, the copies / decode / augment kernels of batch n+1 run on the side stream beside the step of
  batch n on the default stream (they compete for SMs, but the step's gaps — optimiser, EMA, small kernels —
  are filled, and copies use the copy engines);
* on the host, the thread's decode and Python overlap the main thread's step launch (torch releases the GIL
  inside its ops).

Correctness across streams: the thread records a CUDA event after ``prepare``; the consumer makes its current
stream wait on that event (a GPU-side wait, no host sync) and calls ``record_stream`` on every yielded tensor so
the caching allocator does not hand their memory back to the side stream while the step still reads them.

Nothing here draws random numbers: the crop parameters come drawn by the data-loader workers (or the crops are
already made), so prefetching does not change any result — the same crops, in the same order (tested). The
training loop's cursor counts *consumed* batches; batches prepared but not consumed when the loop stops are simply
dropped, and a resume re-reads them.

    with DevicePrefetcher(loader, prepare, device, depth=1) as batches:
        for crops in batches:
            train_step(model, optimizer, crops, ...)

``depth=0`` calls ``prepare`` inline (no thread), for comparison and debugging.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import torch

__all__ = ["DevicePrefetcher"]

_END = object()  # the source is exhausted


class _Failure:
    """An exception raised in the thread, re-raised in the consumer."""

    def __init__(self, error: BaseException):
        self.error = error


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) list / tuple / dict."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class DevicePrefetcher:
    """Iterate ``prepare(batch)`` for each ``batch`` of ``source``, computed ``depth`` batches ahead on a
    background thread (and, on CUDA, a side stream). See the module docstring. Use it as a context manager (or
    call :meth:`close`) so the thread stops when the loop leaves early."""

    def __init__(self, source: Iterable[Any], prepare: Callable[[Any], Any], device: torch.device | str,
                 depth: int = 1):
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
        self.source = source
        self.prepare = prepare
        self.device = torch.device(device)
        self.depth = depth
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread: threading.Thread | None = None
        self._started = False

    # -- consumer side -------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        if self._started:
            raise RuntimeError("a DevicePrefetcher can be iterated once")
        self._started = True
        if self.depth == 0:
            for batch in self.source:
                yield self.prepare(batch)
            return
        self._thread = threading.Thread(target=self._run, name="dino-device-prefetch", daemon=True)
        self._thread.start()
        cuda = self.device.type == "cuda"
        while True:
            item = self._queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            prepared, event = item
            if cuda:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)  # GPU-side ordering, the host does not wait
                for t in _tensors(prepared):
                    if t.is_cuda:
                        t.record_stream(stream)
            yield prepared

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is preparing) and drop what it prepared."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        while thread.is_alive():
            try:  # unblock a put() waiting for room
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)
        self._thread = None

    def __enter__(self) -> "DevicePrefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- producer side (the thread) ------------------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        """Queue ``item``, giving up when asked to stop; True when queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        try:
            if cuda:
                if self.device.index is not None:
                    torch.cuda.set_device(self.device)  # the current device is per thread
                stream = torch.cuda.Stream(self.device)
            for batch in self.source:
                if self._stop.is_set():
                    return
                if cuda:
                    with torch.cuda.stream(stream):
                        prepared = self.prepare(batch)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    prepared, event = self.prepare(batch), None
                del batch
                if not self._put((prepared, event)):
                    return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(error))

"""DevicePrefetcher (dino_model.data.device_prefetch): order, errors, early stop, and no effect on training results.

On the CPU there is no side stream, but the thread, the queue, the read-ahead and the shutdown are the same code
that runs on CUDA.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from dino_model.checkpoint import latest_checkpoint, read_checkpoint
from dino_model.data.device_prefetch import DevicePrefetcher
from dino_model.train import train
from tests.test_train import tiny_config, tiny_images  # noqa: F401 - the module fixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def square(x: int) -> torch.Tensor:
    return torch.full((2, 3), float(x)) ** 2


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_yields_prepared_batches_in_order(depth):
    with DevicePrefetcher(range(10), square, "cpu", depth=depth) as batches:
        out = list(batches)
    assert len(out) == 10
    for i, t in enumerate(out):
        assert torch.equal(t, square(i))


def test_prepares_on_another_thread_and_reads_ahead():
    pulled, threads = [], set()
    ready = threading.Event()

    def source():
        for i in itertools.count():
            pulled.append(i)
            if len(pulled) >= 3:
                ready.set()
            yield i

    def prepare(i):
        threads.add(threading.get_ident())
        return i

    with DevicePrefetcher(source(), prepare, "cpu", depth=2) as batches:
        it = iter(batches)
        assert next(it) == 0
        # while the consumer holds batch 0, the thread prepares 1 and 2 (the queue holds 2) and pulls 3
        assert ready.wait(timeout=10), f"the thread did not read ahead: pulled {pulled}"
        assert threads and threading.get_ident() not in threads
        assert next(it) == 1


def test_errors_reach_the_consumer_with_their_type():
    def prepare(i):
        if i == 2:
            raise ValueError("bad sample 2")
        return i

    with DevicePrefetcher(range(5), prepare, "cpu", depth=1) as batches:
        got = []
        with pytest.raises(ValueError, match="bad sample 2"):
            for x in batches:
                got.append(x)
    assert got == [0, 1]

    def broken_source():
        yield 0
        raise RuntimeError("shard unreadable")

    with DevicePrefetcher(broken_source(), lambda i: i, "cpu", depth=2) as batches:
        with pytest.raises(RuntimeError, match="shard unreadable"):
            list(batches)


def test_close_stops_the_thread_on_an_endless_source():
    batches = DevicePrefetcher(itertools.count(), lambda i: i, "cpu", depth=2)
    for x in batches:
        if x == 3:
            break
    thread = batches._thread
    assert thread is not None and thread.is_alive()
    t0 = time.monotonic()
    batches.close()
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    batches.close()  # idempotent


def test_iterates_once_and_validates_depth():
    batches = DevicePrefetcher([1], lambda i: i, "cpu")
    assert list(batches) == [1]
    with pytest.raises(RuntimeError, match="once"):
        list(batches)
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetcher([1], lambda i: i, "cpu", depth=-1)


def test_training_results_do_not_depend_on_prefetching(tiny_images, tmp_path):  # noqa: F811
    """Device-path augmentation (on the CPU here) run inline vs two batches ahead on the thread: same weights."""
    common = {"data.augment_on": "device", "train.epochs": 1, "train.max_steps": 3,
              "checkpoint.every_n_steps": 0}
    inline = train(tiny_config(tiny_images, tmp_path / "inline", **common, **{"data.prefetch_batches": 0}))
    ahead = train(tiny_config(tiny_images, tmp_path / "ahead", **common, **{"data.prefetch_batches": 2}))
    assert inline.step == ahead.step == 3
    a = read_checkpoint(latest_checkpoint(str(tmp_path / "inline")))
    b = read_checkpoint(latest_checkpoint(str(tmp_path / "ahead")))
    for part in ("student", "teacher", "dino_loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs with prefetching"
    assert inline.metrics["loss"] == ahead.metrics["loss"]

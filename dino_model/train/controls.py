"""The training loop's controls, each deciding one thing from the step: :class:`Cadence` (when to log, agree across
ranks and checkpoint), :class:`StopSignals` (SIGTERM / SIGINT as a request to stop at the next step boundary),
:class:`NonFiniteWatch` (the first non-finite loss, remembered on the device), :class:`Throughput` (images per
second) and :class:`Progress` (``DINO_PROGRESS`` lines for a parent process)."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

from dino_model import distributed as dist_utils
from dino_model.config import DinoConfig
from dino_model.metrics import emit_progress

__all__ = ["Cadence", "StopSignals", "NonFiniteWatch", "Throughput", "Progress"]

log = logging.getLogger("dino_model.train")


@dataclass(frozen=True)
class Cadence:
    """Every "now?" of the loop — log, agree across ranks, checkpoint, stop — decided from the global step alone
    (so every rank decides alike). ``step`` is the number of updates done."""

    total_steps: int
    epochs: int
    log_every: int
    check_every: int  #: agree on NaN losses / stop signals at least this often (each time is a host sync)
    checkpoint_every_steps: int  #: 0 = never by step count
    checkpoint_every_epochs: int
    max_steps: int | None

    @classmethod
    def from_config(cls, cfg: DinoConfig, total_steps: int, device: torch.device) -> "Cadence":
        check_every = cfg.train.nonfinite_check_every or (1 if device.type == "cpu" else cfg.logging.log_every)
        return cls(total_steps, cfg.train.epochs, cfg.logging.log_every, check_every, cfg.checkpoint.every_n_steps,
                   cfg.checkpoint.every_n_epochs, cfg.train.max_steps)

    def reached_max_steps(self, step: int) -> bool:
        return self.max_steps is not None and step >= self.max_steps

    def done(self, step: int) -> bool:
        return step >= self.total_steps or self.reached_max_steps(step)

    def log(self, step: int) -> bool:
        """The first and the last step are always logged."""
        return step == 1 or step % self.log_every == 0 or self.done(step)

    def checkpoint(self, step: int, finished_epoch: int | None = None) -> bool:
        """After ``step``; ``finished_epoch``: the epoch that step completed, if it completed one (the last epoch
        always gets a checkpoint)."""
        if (self.checkpoint_every_steps and step % self.checkpoint_every_steps == 0) or self.reached_max_steps(step):
            return True
        return finished_epoch is not None and (
            (finished_epoch + 1) % self.checkpoint_every_epochs == 0 or finished_epoch + 1 == self.epochs)

    def sync(self, step: int, end_of_epoch: bool) -> bool:
        """A check always precedes a log line and a checkpoint, so no checkpoint ever holds non-finite weights."""
        return step % self.check_every == 0 or end_of_epoch or self.log(step) or self.checkpoint(step)


class StopSignals:
    """SIGTERM / SIGINT / SIGHUP -> ``requested`` (the loop stops at the next step boundary): a service manager's
    stop, Ctrl-C and a closed terminal or SSH session are all an ordinary stop, and torchrun passes the signal it
    got on to its workers. A SIGINT after the first signal raises ``KeyboardInterrupt`` at once (abandon; atomic
    writes leave nothing half-written); a repeated SIGTERM or SIGHUP is the same request again — launchers and
    supervisors repeat it (torchrun forwards one, the parent-death signal of :mod:`dino_model.parent_death` may add
    another), and the checkpoint must still be written. Main thread only."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second signal ({signal.Signals(signum).name}): abandoning the current step")
            log.info("received %s again: still finishing the step and writing the checkpoint",
                     signal.Signals(signum).name)
            return
        self.requested = signum
        log.warning("received %s: finishing the current step, then checkpointing and exiting",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        for sig in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteWatch:
    """The first step whose loss was not finite, remembered on the device (no host sync per step)."""

    NONE = 2**62

    def __init__(self, device: torch.device):
        self.first_bad = torch.tensor(self.NONE, dtype=torch.int64, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, torch.clamp(self.first_bad, max=step))

    def agree(self, stop_signal: int) -> tuple[int | None, int]:
        """(first non-finite step of any rank or None, any rank's stop signal or 0): one small all-reduce (MAX),
        the host sync."""
        flags = torch.stack([-self.first_bad, torch.tensor(stop_signal, dtype=torch.int64, device=self.first_bad.device)])
        dist_utils.all_reduce_max(flags)
        neg_bad, stop_any = flags.tolist()
        return (-neg_bad if -neg_bad < self.NONE else None), int(stop_any)


class Throughput:
    """Images per second over the steps since the previous call."""

    def __init__(self, step: int, global_batch: int):
        self.global_batch = global_batch
        self.last = (step, time.perf_counter())

    def images_per_s(self, step: int) -> float:
        now = time.perf_counter()
        last_step, last_time = self.last
        self.last = (step, now)
        return (step - last_step) * self.global_batch / max(now - last_time, 1e-9)


class Progress:
    """``DINO_PROGRESS`` lines for a parent process (rank 0 with ``logging.progress``; :mod:`dino_model.metrics`)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, event: str, **fields: Any) -> None:
        if self.enabled:
            emit_progress(event, **fields)

"""The fast-path checks of a training run: before DDP and compile, and during its first steps.

:func:`check_training_paths` (from :func:`dino_model.train.setup_run`, on the plain model, before the student is
wrapped in DDP or compiled):

1. **data** (``data.augment_on`` resolving to ``device``): rank 0 takes its first batch and compares the device
   data path with the CPU workers' (:mod:`.data_canary`). Failed: every rank rebuilds its loader with the workers
   augmenting, for the rest of the run.
2. **step** (when the step is not the fp32 eager reference): rank 0 makes the first batch's crops on the chosen
   data path and compares the fast step with the reference on copies (:mod:`.step_canary`), falling back to the
   eager step in the same autocast dtype, or to the reference.

Each decision is rank 0's, broadcast, so every rank takes the same path. Then :class:`FirstStepsGuard` watches
the first :data:`GUARDED_STEPS` steps of a fast step (the run's own compile — with DDP, its graphs are split
differently from the check's — and the CUDA-graph capture happen there): an exception in any rank's step is
agreed on by all ranks (one small all-reduce per guarded step), logged once with its traceback, the state before
the step is restored, a fallback path is chosen as above, and the same batch is stepped again on it. A rank that
fails alone *inside* a collective (the others waiting in DDP's all-reduce) cannot be rescued this way: torchrun
stops the run, as without the guard.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from dino_model import distributed as dist_utils
from dino_model.config import DinoConfig
from dino_model.step import TrainingState

from .data_canary import compare_data_paths, device_multicrop
from .step_canary import REFERENCE_PATH, StepPath, canary_step_args, choose_step_path, configured_step_path
from .verdict import FALLBACK, OFF, REFERENCE, VERIFIED, FastPathError, Verdict, exception_reason, on_rank0, settle

__all__ = ["GUARDED_STEPS", "PeekedLoader", "RunData", "TrainingPaths", "check_training_paths", "GuardedStep",
           "FirstStepsGuard"]

log = logging.getLogger("dino_model.fast_path")

#: Steps of a fast step path watched for exceptions (compile at the first call; CUDA graphs warm up, then record).
GUARDED_STEPS = 3


class PeekedLoader:
    """A loader whose first batch was taken out (to check the paths on it) and is handed out again first; the
    rest comes from the same iterator (the same worker processes)."""

    def __init__(self, loader: Any):
        self.loader = loader
        self._batches = iter(loader)
        self.first: Any = next(self._batches, None)

    @property
    def batches_per_epoch(self) -> int:
        return self.loader.batches_per_epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        first, self.first = self.first, None
        if first is not None:
            yield first
            yield from self._batches


class RunData(Protocol):
    """The data side of a training run at its cursor, as the checks use it (``dino_model.train`` provides it)."""

    @property
    def augment_on_device(self) -> bool:
        """The configured data path: decode and augment on the device (else the CPU workers augment)."""

    def loader(self, on_device: bool) -> Any:
        """A new loader of the cursor's epoch, positioned at the cursor, for that data path."""

    def preparer(self, on_device: bool) -> Callable[[dict[str, Any]], list[torch.Tensor]]:
        """Loader batch -> the step's crops on the device, for that data path."""


@dataclass
class TrainingPaths:
    """What :func:`check_training_paths` decided: the verdicts, where batches are augmented, the step path, and
    the loader of the cursor's epoch to train from."""

    data: Verdict
    step: Verdict
    augment_on_device: bool
    step_path: StepPath
    loader: Any


def _data_path_name(on_device: bool) -> str:
    return "device decode + augmentation" if on_device else "CPU workers' augmentation"


def check_training_paths(cfg: DinoConfig, ctx: dist_utils.DistContext, loader: Any, data: RunData,
                         state: TrainingState, step_args: dict[str, Any] | None) -> TrainingPaths:
    """Steps 1-2 of the module docstring (a collective: every rank calls it). ``loader``: the run's loader of the
    cursor's epoch on the configured data path (``data.augment_on_device``); ``state``: the run's plain model,
    optimiser and scaler (copied, not changed); ``step_args``: the schedules' values at the cursor
    (:func:`canary_step_args`), None when the run has nothing left to train (no check)."""
    mode = cfg.train.fast_path_check
    configured = configured_step_path(cfg, ctx.device)
    on_device = data.augment_on_device
    if mode == "off" or step_args is None:
        why = "" if mode == "off" else "nothing left to train"
        return TrainingPaths(Verdict("data", OFF, _data_path_name(on_device), why),
                             Verdict("step", OFF, configured.describe(), why), on_device, configured, loader)

    # 1. data
    if not on_device:
        data_verdict = Verdict("data", REFERENCE, _data_path_name(False))
    else:
        if ctx.is_main:
            loader = PeekedLoader(loader)
        data_verdict = settle(on_rank0(lambda: _check_data(cfg, ctx, loader.first), ctx.is_main), mode)
        if data_verdict.fell_back:
            on_device = False
            loader = data.loader(False)

    # 2. step
    if configured.is_reference:
        step_verdict, path = Verdict("step", REFERENCE, configured.describe()), configured
    else:
        if ctx.is_main and not isinstance(loader, PeekedLoader):
            loader = PeekedLoader(loader)

        def check() -> tuple[Verdict, StepPath]:
            started = time.perf_counter()
            try:
                crops = data.preparer(on_device)(loader.first)
                chosen, failure, figures = choose_step_path(state.model, state.optimizer, state.grad_scaler, crops,
                                                            cfg, step_args, cfg.train.seed, configured)
            except Exception as error:  # noqa: BLE001 - the check itself failing is a failed check
                chosen, failure, figures = REFERENCE_PATH, exception_reason("the step check", error), {}
            return _step_verdict(chosen, failure, figures, time.perf_counter() - started), chosen

        step_verdict, path = on_rank0(check, ctx.is_main)
        settle(step_verdict, mode)
    return TrainingPaths(data_verdict, step_verdict, on_device, path, loader)


def _check_data(cfg: DinoConfig, ctx: dist_utils.DistContext, batch: dict[str, Any] | None) -> Verdict:
    started = time.perf_counter()
    if batch is None:
        return Verdict("data", OFF, _data_path_name(True), "no batch to check on")
    try:
        failure, figures = compare_data_paths(batch, device_multicrop(cfg.crops, ctx.device), cfg.crops)
    except Exception as error:  # noqa: BLE001 - a device path that raises has failed its check
        failure, figures = exception_reason("the device data path", error), {}
    status = FALLBACK if failure else VERIFIED
    return Verdict("data", status, _data_path_name(not failure), failure, figures, time.perf_counter() - started)


def _step_verdict(chosen: StepPath, failure: str, figures: dict[str, float], seconds: float) -> Verdict:
    return Verdict("step", FALLBACK if failure else VERIFIED, chosen.describe(), failure, figures, seconds)


@dataclass(frozen=True)
class GuardedStep:
    """What :meth:`FirstStepsGuard.step` saw: the step's stats, or — the step raised on some rank — why, with the
    training state already back to what it was before the step."""

    stats: dict[str, torch.Tensor] | None
    failure: str | None = None


class FirstStepsGuard:
    """Watches the first :data:`GUARDED_STEPS` steps of a fast step path (see the module docstring). The loop
    applies its decisions: a :class:`GuardedStep` with a ``failure`` means "put the model back on the plain path,
    ask :meth:`fallback` for the path to use, take the same batch again on it"."""

    def __init__(self, cfg: DinoConfig, ctx: dist_utils.DistContext, path: StepPath, steps: int = GUARDED_STEPS):
        self.cfg, self.ctx, self.path = cfg, ctx, path
        self.mode = cfg.train.fast_path_check
        self.remaining = steps if self.mode != "off" and not path.is_reference else 0

    @property
    def active(self) -> bool:
        return self.remaining > 0

    def step(self, take_step: Callable[[], dict[str, torch.Tensor]], state: TrainingState,
             number: int) -> GuardedStep:
        """``take_step()`` (update ``number``, 1-based, of ``state`` on the guarded path), agreed on by every rank.
        When it raised on any rank: ``strict`` raises :class:`FastPathError`; else ``state`` is restored and the
        failure returned."""
        snapshot = state.snapshot()
        error: BaseException | None = None
        stats = None
        try:
            stats = take_step()
        except Exception as e:  # noqa: BLE001 - decided below, together with the other ranks
            error = e
        flag = torch.tensor([1.0 if error is not None else 0.0], device=self.ctx.device)
        if not dist_utils.all_reduce_max(flag).item():
            self.remaining -= 1
            return GuardedStep(stats)
        self.remaining = 0
        what = f"the {self.path.describe()} step {number}"
        reason = exception_reason(what, error) if error is not None else f"{what} raised on another rank"
        if self.mode == "strict":
            raise FastPathError(Verdict("step", FALLBACK, self.path.describe(), reason)) from error
        state.restore(snapshot)
        return GuardedStep(None, reason)

    def fallback(self, failure: str, state: TrainingState, crops: list[torch.Tensor],
                 step_args: dict[str, Any]) -> tuple[Verdict, StepPath]:
        """Rank 0 checks the fallback paths on ``crops`` from ``state`` (plain: not compiled, not in DDP) and every
        rank takes its verdict (settled: logged) and path."""
        started = time.perf_counter()

        def check() -> tuple[Verdict, StepPath]:
            try:
                chosen, why, figures = choose_step_path(state.model, state.optimizer, state.grad_scaler, crops,
                                                        self.cfg, step_args, self.cfg.train.seed, self.path,
                                                        failure=failure)
            except Exception as e:  # noqa: BLE001
                chosen, why, figures = REFERENCE_PATH, f"{failure}; {exception_reason('the step check', e)}", {}
            return _step_verdict(chosen, why, figures, time.perf_counter() - started), chosen

        verdict, path = on_rank0(check, self.ctx.is_main)
        return settle(verdict, self.mode), path

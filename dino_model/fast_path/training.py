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
from typing import Any, Callable

import torch

from dino_model import distributed as dist_utils
from dino_model.config import DinoConfig
from dino_model.meta_arch import DINO, unwrap
from dino_model.optim import load_optimizer_state, optimizer_state

from .data_canary import compare_data_paths
from .step_canary import REFERENCE_PATH, StepPath, canary_step_args, choose_step_path, configured_step_path
from .verdict import FALLBACK, OFF, REFERENCE, VERIFIED, FastPathError, Verdict, exception_reason, on_rank0, settle

__all__ = ["GUARDED_STEPS", "PeekedLoader", "TrainingPaths", "check_training_paths", "FirstStepsGuard"]

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


def check_training_paths(cfg: DinoConfig, ctx: dist_utils.DistContext, *, loader: Any, augment_on_device: bool,
                         rebuild_loader: Callable[[bool], Any],
                         batch_preparer: Callable[[bool], Callable[[dict], list[torch.Tensor]]],
                         device_augment: Callable[[], Any], model: DINO, optimizer: torch.optim.Optimizer,
                         grad_scaler: torch.amp.GradScaler | None, schedules: Any, step: int, epoch: int,
                         nothing_left: bool = False) -> TrainingPaths:
    """Steps 1-2 of the module docstring (a collective: every rank calls it). ``rebuild_loader(on_device)``: the
    loader of the cursor's epoch at the cursor; ``batch_preparer(on_device)``: loader batch -> crops on the device;
    ``device_augment()``: the device data path's augmenter; ``nothing_left``: the run is already done (no check)."""
    mode = cfg.train.fast_path_check
    configured = configured_step_path(cfg, ctx.device)
    if mode == "off" or nothing_left:
        why = "" if mode == "off" else "nothing left to train"
        return TrainingPaths(Verdict("data", OFF, _data_path_name(augment_on_device), why),
                             Verdict("step", OFF, configured.describe(), why), augment_on_device, configured, loader)

    # 1. data
    if not augment_on_device:
        data = Verdict("data", REFERENCE, _data_path_name(False))
    else:
        if ctx.is_main:
            loader = PeekedLoader(loader)
        data = settle(on_rank0(lambda: _check_data(cfg, loader.first, device_augment), ctx.is_main), mode)
        if data.fell_back:
            augment_on_device = False
            loader = rebuild_loader(False)

    # 2. step
    if configured.is_reference:
        step_verdict, path = Verdict("step", REFERENCE, configured.describe()), configured
    else:
        if ctx.is_main and not isinstance(loader, PeekedLoader):
            loader = PeekedLoader(loader)

        def check() -> tuple[Verdict, StepPath]:
            started = time.perf_counter()
            try:
                crops = batch_preparer(augment_on_device)(loader.first)
                chosen, failure, figures = choose_step_path(
                    model, optimizer, grad_scaler, crops, cfg, canary_step_args(schedules, step, epoch),
                    cfg.train.seed, configured)
            except Exception as error:  # noqa: BLE001 - the check itself failing is a failed check
                chosen, failure, figures = REFERENCE_PATH, exception_reason("the step check", error), {}
            return _step_verdict(chosen, failure, figures, time.perf_counter() - started), chosen

        step_verdict, path = on_rank0(check, ctx.is_main)
        settle(step_verdict, mode)
    return TrainingPaths(data, step_verdict, augment_on_device, path, loader)


def _check_data(cfg: DinoConfig, batch: dict[str, Any] | None, device_augment: Callable[[], Any]) -> Verdict:
    started = time.perf_counter()
    if batch is None:
        return Verdict("data", OFF, _data_path_name(True), "no batch to check on")
    try:
        failure, figures = compare_data_paths(batch, device_augment(), cfg.crops)
    except Exception as error:  # noqa: BLE001 - a device path that raises has failed its check
        failure, figures = exception_reason("the device data path", error), {}
    status = FALLBACK if failure else VERIFIED
    return Verdict("data", status, _data_path_name(not failure), failure, figures, time.perf_counter() - started)


def _step_verdict(chosen: StepPath, failure: str, figures: dict[str, float], seconds: float) -> Verdict:
    return Verdict("step", FALLBACK if failure else VERIFIED, chosen.describe(), failure, figures, seconds)


class FirstStepsGuard:
    """Watches the first :data:`GUARDED_STEPS` steps of a fast step path (see the module docstring). ``run`` is
    the :class:`dino_model.train.Run`; it provides ``step_once(crops)``, ``use_step_path(path)`` and
    ``record_fast_path(verdict)``."""

    def __init__(self, mode: str, path: StepPath, steps: int = GUARDED_STEPS):
        self.mode = mode
        self.remaining = steps if mode != "off" and not path.is_reference else 0

    @property
    def active(self) -> bool:
        return self.remaining > 0

    def step(self, run: Any, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """``run.step_once(crops)``, or — when it raised on any rank — the same batch again on a fallback path."""
        snapshot = _snapshot(run)
        error: BaseException | None = None
        try:
            stats = run.step_once(crops)
        except Exception as e:  # noqa: BLE001 - decided below, together with the other ranks
            error = e
        flag = torch.tensor([1.0 if error is not None else 0.0], device=run.ctx.device)
        if not dist_utils.all_reduce_max(flag).item():
            self.remaining -= 1
            return stats
        self.remaining = 0
        what = f"the {run.step_path.describe()} step {run.step + 1}"
        reason = exception_reason(what, error) if error is not None else f"{what} raised on another rank"
        if self.mode == "strict":
            raise FastPathError(Verdict("step", FALLBACK, run.step_path.describe(), reason)) from error
        started = time.perf_counter()
        _restore(run, snapshot)
        run.use_step_path(None)  # plain: not compiled, not in DDP, so the check can copy it

        def check() -> tuple[Verdict, StepPath]:
            try:
                chosen, failure, figures = choose_step_path(
                    run.model, run.optimizer, run.grad_scaler, crops, run.cfg,
                    canary_step_args(run.schedules, run.step, run.epoch), run.cfg.train.seed, run.step_path,
                    failure=reason)
            except Exception as e:  # noqa: BLE001
                chosen, failure, figures = REFERENCE_PATH, f"{reason}; {exception_reason('the step check', e)}", {}
            return _step_verdict(chosen, failure, figures, time.perf_counter() - started), chosen

        verdict, path = on_rank0(check, run.ctx.is_main)
        run.use_step_path(path)
        run.record_fast_path(settle(verdict, self.mode))
        return run.step_once(crops)


def _snapshot(run: Any) -> dict[str, Any]:
    """What one step changes: student, teacher, loss centre, optimiser state, grad scaler (copies on the device)."""
    model = run.model
    return {
        "student": {k: v.detach().clone() for k, v in model.student_module().state_dict().items()},
        "teacher": {k: v.detach().clone() for k, v in unwrap(model.teacher).state_dict().items()},
        "dino_loss": {k: v.detach().clone() for k, v in model.dino_loss.state_dict().items()},
        "optimizer": optimizer_state(run.optimizer),
        "grad_scaler": run.grad_scaler.state_dict() if run.grad_scaler is not None else None,
    }


def _restore(run: Any, snapshot: dict[str, Any]) -> None:
    model = run.model
    model.student_module().load_state_dict(snapshot["student"])
    unwrap(model.teacher).load_state_dict(snapshot["teacher"])
    model.dino_loss.load_state_dict(snapshot["dino_loss"])
    load_optimizer_state(run.optimizer, snapshot["optimizer"])
    if run.grad_scaler is not None and snapshot["grad_scaler"] is not None:
        run.grad_scaler.load_state_dict(snapshot["grad_scaler"])

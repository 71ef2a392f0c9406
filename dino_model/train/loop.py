"""The training loop, as the package docstring lists it: :func:`setup_run`, :func:`run_epoch` per epoch,
:func:`finish`; :func:`train` runs them under :class:`StopSignals` and records how the run ended."""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch

from dino_model import distributed as dist_utils
from dino_model.checkpoint import (
    latest_checkpoint,
    read_checkpoint,
    remove_stale_writes,
    restore_checkpoint,
    resume_cursor,
)
from dino_model.config import ConfigError, DinoConfig
from dino_model.data.device_prefetch import DevicePrefetcher
from dino_model.fast_path.step_canary import canary_step_args
from dino_model.fast_path.training import FirstStepsGuard, check_training_paths
from dino_model.health import HealthMonitor, stop_reason
from dino_model.metrics import MultiLogger, build_loggers
from dino_model.schedules import build_schedules
from dino_model.step import StepSettings, resolve_precision

from .builders import (
    CursorData,
    build_train_loader,
    build_training_state,
    check_resume_layout,
    prepare_model,
    teacher_replicas_identical,
)
from .controls import Cadence, NonFiniteWatch, Progress, StopSignals, Throughput
from .outcomes import TrainingCollapsed, TrainingTerminated, TrainResult
from .knn_monitor import KnnMonitor, monitor_every_epochs
from .run import Run

__all__ = ["setup_run", "run_epoch", "finish", "train"]

log = logging.getLogger("dino_model.train")


def setup_run(cfg: DinoConfig) -> Run:
    """Step 1 of the package docstring: a run ready for its next step, resumed from ``checkpoint.uri`` if it holds
    a checkpoint (and ``checkpoint.resume``)."""
    cfg.validate()
    if not cfg.data.source:
        raise ConfigError("data.source must be set: a shard-set URI (with manifest.json) or an ImageFolder path")
    ctx = dist_utils.init(cfg.train.device)
    _, use_scaler = resolve_precision(cfg.train.precision, ctx.device)
    resume_from, checkpoint = _find_resume_point(cfg, ctx)
    step, epoch, batch = resume_cursor(checkpoint)

    # The loader of the cursor's epoch tells how many steps an epoch has (a finished run builds the last epoch's).
    first_epoch = min(epoch, cfg.train.epochs - 1)
    data = CursorData(cfg, ctx, epoch, batch)
    loader = build_train_loader(cfg, ctx, first_epoch, batch if first_epoch == epoch else 0)
    steps_per_epoch = int(loader.batches_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"data.source {cfg.data.source!r} yields no full batch of {cfg.data.batch_size_per_gpu} "
                         f"per rank with {ctx.world_size} ranks")
    state = build_training_state(cfg, ctx, torch.amp.GradScaler(ctx.device.type) if use_scaler else None)
    schedules = build_schedules(cfg, steps_per_epoch, ctx.world_size)
    health = HealthMonitor.from_config(cfg, steps_per_epoch) if cfg.train.health != "off" else None
    if checkpoint is not None:
        check_resume_layout(checkpoint, cfg, ctx)
        parts = {**state.parts(), **({"health": health} if health is not None else {})}
        restore_checkpoint(checkpoint, parts, rank=ctx.rank, device=ctx.device, optional=("health",))
        del checkpoint
        if ctx.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, batch)
    cadence = Cadence.from_config(cfg, schedules.total_steps, ctx.device)

    # The fast paths prove themselves on rank 0's first batch, on copies of the plain model, before DDP and
    # compile; every rank takes rank 0's decision (dino_model.fast_path).
    step_args = None if cadence.done(step) else canary_step_args(schedules, step, epoch)
    paths = check_training_paths(cfg, ctx, loader, data, state, step_args)
    prepare_model(cfg, ctx, state, paths.step_path)

    loggers = build_loggers(cfg.logging.loggers) if ctx.is_main else MultiLogger()  # rank 0 logs
    loggers.on_run_start(schedules.total_steps, cfg.train.epochs)
    run = Run(cfg=cfg, ctx=ctx, state=state, step_settings=StepSettings.from_config(cfg, paths.step_path.autocast_dtype),
              schedules=schedules, cadence=cadence, steps_per_epoch=steps_per_epoch,
              augment_on_device=paths.augment_on_device, step_path=paths.step_path, fast_path={},
              first_steps=FirstStepsGuard(cfg, ctx, paths.step_path),
              prepare_batch=data.preparer(paths.augment_on_device), loggers=loggers,
              progress=Progress(ctx.is_main and cfg.logging.progress), watch=NonFiniteWatch(ctx.device),
              throughput=Throughput(step, cfg.data.batch_size_per_gpu * ctx.world_size), step=step, epoch=epoch,
              batch=batch, last_checkpoint=resume_from, health=health,
              knn=KnnMonitor.from_config(cfg) if cfg.monitor.val_source and ctx.is_main else None,
              loader=paths.loader)
    run.record_fast_path(paths.data, paths.step, announce=False)
    _announce_start(run, resume_from)
    if step == 0:
        run.measure_learning_curve()  # the randomly initialised backbone: where the learning curve starts
    return run


def _find_resume_point(cfg: DinoConfig, ctx: dist_utils.DistContext) -> tuple[str | None, dict[str, Any] | None]:
    """Clear what interrupted checkpoint writes left (rank 0), then the latest checkpoint under ``checkpoint.uri``
    (the same file on every rank) and its contents, or ``(None, None)``."""
    if ctx.is_main:
        for removed in remove_stale_writes(cfg.checkpoint.uri):
            log.info("removed what an interrupted checkpoint write left: %s", removed)
    resume_from = latest_checkpoint(cfg.checkpoint.uri) if cfg.checkpoint.resume else None
    resume_from = dist_utils.broadcast_object(resume_from)  # every rank resumes from the same file
    # On the CPU: RNG states must stay CPU tensors; load_state_dict copies the weights to the device.
    return resume_from, (read_checkpoint(resume_from, map_location="cpu") if resume_from else None)


def _announce_start(run: Run, resume_from: str | None) -> None:
    """The ``start`` progress line: the run's shape, its paths and its config, for the parent process."""
    run.progress("start", step=run.step, total_steps=run.schedules.total_steps, steps_per_epoch=run.steps_per_epoch,
                 epochs=run.cfg.train.epochs, world_size=run.ctx.world_size,
                 global_batch=run.cfg.data.batch_size_per_gpu * run.ctx.world_size, device=str(run.ctx.device),
                 precision=run.step_path.precision, step_path=run.step_path.describe(),
                 augment_on="device" if run.augment_on_device else "workers", resumed_from=resume_from,
                 checkpoint_uri=run.cfg.checkpoint.uri, config=run.cfg.to_dict(),
                 fast_path={part: v.as_record() for part, v in run.fast_path.items()})


def run_epoch(run: Run, stop: StopSignals) -> bool:
    """Step 2 of the package docstring: train from the cursor to the end of its epoch, or to ``train.max_steps``,
    or to a stop: a stop signal, or a health verdict with ``train.health=stop``; returns whether a stop ended it
    (after its checkpoint)."""
    loader = run.take_loader()
    if int(loader.batches_per_epoch) != run.steps_per_epoch:
        raise RuntimeError(f"epoch {run.epoch} has {loader.batches_per_epoch} batches, the first had "
                           f"{run.steps_per_epoch}: the schedules assume a constant epoch length")
    epoch_loss, epoch_steps, stopping = torch.zeros((), device=run.ctx.device), 0, False
    # Batches arrive as crops on the device, prepared ahead on a side thread / CUDA stream. Leaving the block drops
    # what was prepared ahead (a resume re-reads it from the cursor) and shuts the workers down.
    with DevicePrefetcher(loader, run.prepare_batch, run.ctx.device, depth=run.cfg.data.prefetch_batches) as batches:
        for crops in batches:
            stats = run.take_step(crops)
            epoch_loss += stats["loss"]
            epoch_steps += 1
            end_of_epoch = run.batch >= run.steps_per_epoch
            # Every decision below is taken identically on all ranks: the flags are agreed at sync points.
            if run.cadence.sync(run.step, end_of_epoch) or (stop.requested and not run.ctx.distributed):
                stopping = run.agree(stop)
            if run.cadence.log(run.step):
                run.log_step(stats)  # (every rank judges the run's health alike here)
                stopping = stopping or bool(run.collapsed)
            if end_of_epoch:
                break  # the epoch's end below covers every reason to write a checkpoint now
            if run.cadence.checkpoint(run.step) or stopping:
                run.write_checkpoint(final=stopping or run.cadence.done(run.step))
            if run.cadence.reached_max_steps(run.step) or stopping:
                return stopping
    if run.batch < run.steps_per_epoch:
        raise RuntimeError(f"epoch {run.epoch} ended after {run.batch} of {run.steps_per_epoch} batches")
    mean_loss = float(dist_utils.all_reduce_mean((epoch_loss / max(epoch_steps, 1)).reshape(1)).item())
    run.progress("epoch", epoch=run.epoch, step=run.step, loss=mean_loss)
    if run.ctx.is_main:
        log.info("epoch %d done at step %d, mean loss %.4f", run.epoch, run.step, mean_loss)
    finished_epoch, run.epoch, run.batch = run.epoch, run.epoch + 1, 0
    every = monitor_every_epochs(run.cfg, run.steps_per_epoch * run.cfg.data.batch_size_per_gpu * run.ctx.world_size)
    if (finished_epoch + 1) % every == 0 or run.epoch == run.cfg.train.epochs:
        run.measure_learning_curve()
    if run.cadence.checkpoint(run.step, finished_epoch) or stopping:
        run.write_checkpoint(final=stopping or run.cadence.done(run.step))
    return stopping


def finish(run: Run) -> TrainResult:
    """Step 3 of the package docstring: the teachers agree across ranks; rank 0 exports the teacher backbone."""
    status = "completed" if run.step >= run.schedules.total_steps else "max_steps"
    replicas_identical = teacher_replicas_identical(run.model)
    if not replicas_identical and run.ctx.is_main:
        log.warning("teacher weights differ between ranks: the replicas drifted apart")
    export = None
    if run.cfg.export.enabled and run.ctx.is_main:
        from dino_model.export import export_backbone

        m = run.cfg.model
        export = export_backbone(run.model.teacher_backbone(), run.cfg.export_uri, arch=m.arch,
                                 patch_size=m.patch_size, img_size=m.img_size, step=run.step, epoch=run.epoch,
                                 training_config=run.cfg.to_dict())
        log.info("teacher backbone exported: %s", export["weights"])
    dist_utils.barrier()
    run.progress("end", status=status, step=run.step, epoch=run.epoch, checkpoint=run.last_checkpoint,
                 export=export, teacher_replicas_identical=replicas_identical, total_steps=run.schedules.total_steps,
                 epochs_done=run.epochs_done, fast_path={part: v.as_record() for part, v in run.fast_path.items()})
    return TrainResult(step=run.step, epoch=run.epoch, status=status, checkpoint=run.last_checkpoint, export=export,
                       metrics=run.last_metrics)


def _stopped(run: Run, stop: StopSignals) -> tuple[str, Exception]:
    """A run that a stop ended (its checkpoint written): the ``end`` progress line, then its stop reason and the
    exception that ends :func:`train` — :class:`TrainingCollapsed` for a health stop, else
    :class:`TrainingTerminated`."""
    if run.collapsed:
        reason = stop_reason(run.collapsed)
        run.progress("end", status=reason, step=run.step, epoch=run.epoch, checkpoint=run.last_checkpoint,
                     total_steps=run.schedules.total_steps, epochs_done=run.epochs_done,
                     health=run.health.last.as_record() if run.health.last else None)
        detail = run.health.last.describe() if run.health.last else run.collapsed
        return reason, TrainingCollapsed(run.collapsed, reason, run.step, run.last_checkpoint, detail)
    run.progress("end", status="terminated", step=run.step, epoch=run.epoch, checkpoint=run.last_checkpoint,
                 total_steps=run.schedules.total_steps, epochs_done=run.epochs_done)
    return "cancelled", TrainingTerminated(stop.requested or int(signal.SIGTERM), run.step, run.last_checkpoint)


def train(cfg: DinoConfig) -> TrainResult:
    """Run (or resume) DINO pretraining as configured; see the package docstring."""
    run = setup_run(cfg)
    stop_reason = "failed"
    try:
        with StopSignals() as stop:
            while not run.cadence.done(run.step):
                if run_epoch(run, stop):
                    stop_reason, error = _stopped(run, stop)
                    raise error
        result = finish(run)
        stop_reason = result.status
        return result
    except KeyboardInterrupt:
        stop_reason = "cancelled"
        raise
    finally:
        # What the run did, for the loggers that record it (MLflow's run tags): steps, epochs, why it stopped.
        try:
            run.loggers.on_run_end(run.step, stop_reason)
        except Exception as e:  # noqa: BLE001 - a record that cannot be written must not hide why the run ended
            log.warning("could not record the end of the run (%s: %s)", type(e).__name__, e)
        run.loggers.close()

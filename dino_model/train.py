"""DINO self-supervised pretraining: the one entry point, for one CPU process, one GPU, or many GPUs and nodes.

One process (CPU, or one GPU when available)::

    python -m dino_model.train --config run.yaml [--preset small] [section.field=value ...]

One node with G GPUs, or N nodes (run the same command on every node)::

    torchrun --nproc_per_node=G -m dino_model.train --config run.yaml [overrides]
    torchrun --nproc_per_node=G --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT \\
        -m dino_model.train --config run.yaml [overrides]

Several processes on a CPU machine (gloo)::

    torchrun --nproc_per_node=2 -m dino_model.train --config run.yaml train.device=cpu

Examples of overrides: ``data.source=s3://bucket/imagenette-128/train`` (a shard set holding ``manifest.json``,
or an ImageFolder directory), ``checkpoint.uri=s3://bucket/runs/r1``, ``optim.lr=1e-3``, ``train.max_steps=200``,
``logging.loggers=[console,'jsonl:/tmp/m.jsonl']``. See :mod:`dino_model.config` for every field.

What a run does (``train()`` below reads in this order):

1. :func:`setup_run`: join the process group (NCCL on GPU, gloo on CPU); remove what interrupted checkpoint writes
   left under ``checkpoint.uri``; find the latest checkpoint there; build the data loader of its cursor's epoch
   (which tells the steps per epoch); seed and build student, teacher and loss, the optimiser and the per-step
   schedules; restore the checkpoint; check the fast paths on rank 0's first batch (:mod:`dino_model.fast_path`:
   device data path vs CPU workers, fast step vs fp32 eager step; a failure falls back to the reference path,
   every rank following rank 0); then the student in DDP when distributed, compiled and with fused AdamW when the
   step path says so (on CUDA by default); build the loggers, which record the verdicts.
2. :func:`run_epoch`, from the cursor to the end of each epoch: per step, lr / weight decay / teacher momentum /
   teacher temperature from the schedule arrays at the global step, forward and backward, gradient clipping (per
   parameter by default), drop the last layer's gradients during the ``freeze_last_layer`` epochs, optimiser
   step, teacher EMA (:func:`dino_model.step.train_step`); then metrics, agreement across ranks on NaN losses and
   stop signals, and checkpoints, each when the :class:`Cadence` says.
3. :func:`finish`: check that the ranks' teachers are identical and export the teacher backbone (safetensors +
   JSON, loadable by timm) to ``export.uri`` (default ``<checkpoint.uri>/export``).

Exit codes of ``python -m dino_model.train``:

* 0   finished (all epochs, or ``train.max_steps`` reached; a checkpoint and the export are written)
* 1   any other error (the traceback is printed)
* 2   invalid configuration (the message names the field)
* 3   non-finite loss (the message names the step; no checkpoint is written after it, earlier ones stay intact)
* 4   a fast path failed its check with ``train.fast_path_check=strict`` (the message gives the figures)
* 143 stopped by SIGTERM or SIGINT: the current step is finished, a checkpoint is written (atomically; a
  second SIGINT abandons it and nothing half-written remains, a repeated SIGTERM does not), then the process
  exits (logged as a warning: a stop on request is no error). Under torchrun, each worker exits 143 and torchrun
  itself reports the failure.

With ``DINO_PARENT_DEATH_SIGNAL=SIGTERM`` in the environment (the pretrain flow's launcher sets it) every process
gets SIGTERM when its parent dies, so a trainer never outlives a killed ``torchrun`` (:mod:`dino_model.parent_death`).

Rank 0 prints progress lines a person reads (``epoch 1/100 · step 312/31200 · 41 img/s · eta 2h10m · loss ...``,
the ``console`` logger) and, with ``logging.progress``, machine-readable lines ``DINO_PROGRESS {json}`` (see
:mod:`dino_model.metrics`) for a parent process such as the pretrain flow.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from dino_model import distributed as dist_utils
from dino_model.checkpoint import (
    config_source,
    gather_rng_states,
    latest_checkpoint,
    make_checkpoint,
    read_checkpoint,
    remove_stale_writes,
    restore_checkpoint,
    resume_cursor,
    save_checkpoint,
)
from dino_model.config import ConfigError, DinoConfig, load_config
from dino_model.data.device_prefetch import DevicePrefetcher
from dino_model.data.rng import derive_seed
from dino_model.fast_path import FastPathError, Verdict
from dino_model.fast_path.data_canary import device_multicrop
from dino_model.fast_path.step_canary import StepPath, compile_model
from dino_model.fast_path.training import FirstStepsGuard, check_training_paths
from dino_model.meta_arch import DINO, unwrap
from dino_model.metrics import MultiLogger, build_loggers, emit_progress
from dino_model.optim import build_optimizer, load_optimizer_state, optimizer_state, param_groups
from dino_model.parent_death import exit_with_parent_from_env
from dino_model.schedules import Schedules, build_schedules
from dino_model.step import StepSettings, resolve_precision, train_step

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_CONFIG",
    "EXIT_NONFINITE",
    "EXIT_FAST_PATH",
    "EXIT_TERMINATED",
    "NonFiniteLoss",
    "TrainingTerminated",
    "TrainResult",
    "Cadence",
    "Run",
    "setup_run",
    "run_epoch",
    "finish",
    "train",
    "build_train_loader",
    "main",
]

log = logging.getLogger("dino_model.train")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_FAST_PATH = 4
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's convention for "terminated by a signal"

# Stats of train_step that are averaged over ranks at log steps (order matters: one all-reduce).
STAT_KEYS = (
    "loss",
    "grad_norm",
    "teacher_entropy",
    "teacher_kl_to_uniform",
    "teacher_kl_to_center",
    "kl_teacher_student",
)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; ``step`` is the 1-based global step whose loss was first non-finite."""

    def __init__(self, step: int, epoch: int, last_checkpoint: str | None):
        self.step = step
        self.epoch = epoch
        self.last_checkpoint = last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
        super().__init__(
            f"non-finite loss at step {step} (epoch {epoch}): stopping without writing a checkpoint ({where}). "
            "Lower optim.lr, raise loss.teacher_temp warm-up, or check the data."
        )


class TrainingTerminated(RuntimeError):
    """SIGTERM/SIGINT received: training stopped at a step boundary after writing ``checkpoint``."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint: {checkpoint or 'none'}"
        )


@dataclass
class TrainResult:
    """What :func:`train` did: the global step reached, why it stopped, and where its outputs are."""

    step: int
    epoch: int
    status: str  #: "completed" (all epochs) or "max_steps"
    checkpoint: str | None
    export: dict[str, str] | None
    metrics: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------------
# pieces of a run
# ------------------------------------------------------------------------------------------------------------------


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
    """SIGTERM / SIGINT -> ``requested`` (the loop stops at the next step boundary). A SIGINT after the first signal
    raises ``KeyboardInterrupt`` at once (abandon; atomic writes leave nothing half-written); a repeated SIGTERM
    is the same request again — launchers and supervisors repeat it (torchrun forwards one, the parent-death signal
    of :mod:`dino_model.parent_death` may add another), and the checkpoint must still be written. Main thread
    only."""

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
        for sig in (signal.SIGTERM, signal.SIGINT):
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


def augment_on_device(cfg: DinoConfig, device: torch.device) -> bool:
    """``data.augment_on``: whether the training process decodes and augments batches on its device."""
    mode = cfg.data.augment_on
    return mode == "device" or (mode == "auto" and device.type == "cuda")


def build_train_loader(cfg: DinoConfig, ctx: dist_utils.DistContext, epoch: int, start_batch: int = 0,
                       on_device: bool | None = None):
    """The reader for one epoch, positioned at ``start_batch`` (the saved cursor). ``on_device`` (default: as
    ``data.augment_on`` resolves): the workers yield encoded bytes plus each sample's drawn crop parameters, for
    the training process to decode and augment on its device; else they augment."""
    from dino_model.data.augment import MultiCropAugmentation
    from dino_model.data.gpu_augment import CropParamSampler
    from dino_model.data.reader import build_loader

    on_device = augment_on_device(cfg, ctx.device) if on_device is None else on_device
    return build_loader(
        cfg.data.source,
        batch_size=cfg.data.batch_size_per_gpu,
        transform=None if on_device else MultiCropAugmentation(cfg.crops),
        decode=not on_device,
        param_sampler=CropParamSampler(cfg.crops) if on_device else None,
        seed=cfg.train.seed,
        epoch=epoch,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=cfg.data.num_workers,
        start_batch=start_batch,
        resampled=cfg.data.resampled,
        epoch_length=cfg.data.epoch_length,
        shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=cfg.data.pin_memory and ctx.device.type == "cuda",
    )


def batch_preparer(cfg: DinoConfig, device: torch.device,
                   on_device: bool | None = None) -> Callable[[dict[str, Any]], list[torch.Tensor]]:
    """A loader batch -> the step's crops on the device (runs on the prefetch thread): decode + augment the whole
    batch on the device (``on_device``, default as ``data.augment_on`` resolves), or copy the workers' crops
    there."""
    if augment_on_device(cfg, device) if on_device is None else on_device:
        augment = device_multicrop(cfg.crops, device)
        return lambda batch: augment(batch["encoded"], batch["params"])
    return lambda batch: [c.to(device, non_blocking=True) for c in batch["crops"]]


def build_model_and_optimizer(cfg: DinoConfig, ctx: dist_utils.DistContext) -> tuple[DINO, torch.optim.Optimizer]:
    """Student, teacher and loss on this rank's device — identical initial replicas on every rank (same seed) —
    and the reference's (for-each) optimiser: plain, so the fast-path check can copy them; :func:`prepare_model`
    makes them what the step path needs."""
    torch.manual_seed(cfg.train.seed)
    model = DINO.from_config(cfg).to(ctx.device)
    optimizer = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()),
                                momentum=cfg.optim.sgd_momentum)
    return model, optimizer


def prepare_model(cfg: DinoConfig, ctx: dist_utils.DistContext, model: DINO, optimizer: torch.optim.Optimizer,
                  grad_scaler: torch.amp.GradScaler | None, path: StepPath | None,
                  ) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler | None]:
    """Put ``model`` on step path ``path`` (in place): SyncBatchNorm when distributed with ``model.sync_bn``, the
    student in DDP when distributed, compiled when the path is; the optimiser rebuilt fused or not as the path
    says, its state kept; a GradScaler for fp16 only. ``path=None``: back to plain (not compiled, no DDP), for the
    first-steps guard's check. Returns the optimiser and the grad scaler."""
    model.uncompile()
    model.student = unwrap(model.student)
    if path is None:
        return optimizer, grad_scaler
    if ctx.world_size > 1 and cfg.model.sync_bn:
        model.convert_sync_batchnorm()
    rebuilt = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()),
                              momentum=cfg.optim.sgd_momentum, fused=path.fused)
    load_optimizer_state(rebuilt, optimizer_state(optimizer))
    if path.autocast_dtype != torch.float16:
        grad_scaler = None
    elif grad_scaler is None:
        grad_scaler = torch.amp.GradScaler(ctx.device.type)
    if dist_utils.is_distributed():
        model.student = nn.parallel.DistributedDataParallel(
            model.student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if path.compiled:
        compile_model(model, path)
    return rebuilt, grad_scaler


def teacher_replicas_identical(model: DINO) -> bool:
    """Whether every rank holds bit-identical teacher weights (a collective; True in a single process). Checked
    once at the end: the teacher is never all-reduced, it stays in sync only because every rank applies the same
    EMA to the same (DDP-averaged) student."""
    if not dist_utils.is_distributed():
        return True
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model.teacher).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * dist_utils.get_world_size()
    torch.distributed.all_gather_object(digests, h.hexdigest())
    return len(set(digests)) == 1


# ------------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a run holds between steps: made by :func:`setup_run`, advanced by :func:`run_epoch`, ended by
    :func:`finish`. ``(epoch, batch)`` is the data cursor, the next batch to read."""

    cfg: DinoConfig
    ctx: dist_utils.DistContext
    model: DINO
    optimizer: torch.optim.Optimizer
    grad_scaler: torch.amp.GradScaler | None
    step_settings: StepSettings
    schedules: Schedules
    cadence: Cadence
    steps_per_epoch: int
    augment_on_device: bool  #: where batches are decoded and augmented (as the data check decided)
    step_path: StepPath  #: how the step runs (as the step check decided)
    fast_path: dict[str, Verdict]  #: the fast-path verdicts ("data", "step")
    first_steps: FirstStepsGuard
    prepare_batch: Callable[[dict[str, Any]], list[torch.Tensor]]
    loggers: MultiLogger
    progress: Progress
    watch: NonFiniteWatch
    throughput: Throughput
    step: int
    epoch: int
    batch: int
    last_checkpoint: str | None
    loader: Any = None  #: the loader of the cursor's epoch once built (setup_run builds the first)
    last_metrics: dict[str, float] = field(default_factory=dict)

    def take_loader(self) -> Any:
        """The loader of the cursor's epoch, positioned at the cursor, built here unless setup_run already did."""
        loader, self.loader = self.loader, None
        return loader if loader is not None else build_train_loader(self.cfg, self.ctx, self.epoch, self.batch,
                                                                    on_device=self.augment_on_device)

    def take_step(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One update at schedule index ``step`` (through the first-steps guard while it watches); advances the
        step and the cursor."""
        stats = self.first_steps.step(self, crops) if self.first_steps.active else self.step_once(crops)
        self.step += 1
        self.batch += 1
        self.watch.observe(stats["loss"], self.step)
        return stats

    def step_once(self, crops: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`dino_model.step.train_step` at schedule index ``step``, on the run's step path."""
        # Randomness inside the step (drop-path) is a function of (seed, rank, step) rather than of everything
        # drawn before, so a resumed run draws what the uninterrupted one drew.
        torch.manual_seed(derive_seed(self.cfg.train.seed, "step", self.ctx.rank, self.step))
        return train_step(self.model, self.optimizer, crops, epoch=self.epoch, settings=self.step_settings,
                          grad_scaler=self.grad_scaler, **self.schedules.at(self.step))

    def use_step_path(self, path: StepPath | None) -> None:
        """Run the step on ``path`` from now on (``None``: plain, for a check; see :func:`prepare_model`)."""
        self.optimizer, self.grad_scaler = prepare_model(self.cfg, self.ctx, self.model, self.optimizer,
                                                         self.grad_scaler, path)
        if path is not None:
            self.step_path = path
            self.step_settings = StepSettings.from_config(self.cfg, path.autocast_dtype)

    def record_fast_path(self, *verdicts: Verdict, announce: bool = True) -> None:
        """Keep the verdicts and hand them to the loggers (MLflow tags and params, the console) and, with
        ``announce``, to the parent process as a ``fast_path`` progress line (the ``start`` line carries the first
        verdicts)."""
        for verdict in verdicts:
            self.fast_path[verdict.part] = verdict
        records = {part: v.as_record() for part, v in self.fast_path.items()}
        self.loggers.on_fast_path(records)
        if announce:
            self.progress("fast_path", **records)

    def agree(self, stop: StopSignals) -> bool:
        """Agree with the other ranks: raise :class:`NonFiniteLoss` if any rank saw one; whether any rank was
        asked to stop."""
        bad_step, stop_any = self.watch.agree(stop.requested)
        if bad_step is not None:
            self.progress("error", kind="nonfinite", step=bad_step, epoch=self.epoch,
                          last_checkpoint=self.last_checkpoint)
            raise NonFiniteLoss(bad_step, self.epoch, self.last_checkpoint)
        return bool(stop_any)

    def log_step(self, stats: dict[str, torch.Tensor]) -> None:
        """Step metrics averaged over ranks, to the loggers and as a progress line (a collective)."""
        vec = torch.stack([stats[k].float().reshape(()) for k in STAT_KEYS])
        metrics = dict(zip(STAT_KEYS, dist_utils.all_reduce_mean(vec).tolist()))
        metrics.update(epoch=float(self.epoch), **self.schedules.at(self.step - 1),
                       images_per_s=self.throughput.images_per_s(self.step))
        if self.grad_scaler is not None:  # fp16: NaN/inf gradients mean a skipped step and a lower scale
            metrics["grad_scale"] = float(self.grad_scaler.get_scale())
        self.last_metrics = metrics
        self.loggers.log(self.step, metrics)
        self.progress("step", **{"step": self.step, "total_steps": self.schedules.total_steps, "batch": self.batch,
                                 **metrics, "epoch": self.epoch})

    @property
    def epochs_done(self) -> float:
        """Epochs of updates done, fractional (a stop at ``max_steps`` or on a signal ends mid-epoch)."""
        return round(self.step / self.steps_per_epoch, 4)

    def write_checkpoint(self, final: bool = False) -> None:
        """A checkpoint of this step and cursor (a collective: every rank calls it; rank 0 writes). ``final``: the
        run ends after it (its last step, ``max_steps`` or a stop signal), which ``logging.mlflow_checkpoints=last``
        keeps."""
        rng = gather_rng_states(self.ctx.device)
        written = None
        if self.ctx.is_main:
            state = make_checkpoint(self.model, self.optimizer, self.grad_scaler, step=self.step,
                                    cursor=(self.epoch, self.batch), rng=rng, config=self.cfg.to_dict(),
                                    metrics=self.last_metrics, world_size=self.ctx.world_size)
            written = save_checkpoint(self.cfg.checkpoint.uri, state, keep_last=self.cfg.checkpoint.keep_last)
            self.progress("checkpoint", step=self.step, epoch=self.epoch, uri=written)
            self.loggers.on_checkpoint(written, self.step)  # e.g. MLflow records where it is
            keep = self.cfg.logging.mlflow_checkpoints
            if keep == "all" or (keep == "last" and final):
                self.loggers.archive_checkpoint(written, self.step)  # e.g. MLflow uploads a copy as a run artifact
            log.info("checkpoint written: %s", written)
        # Nobody leaves (or lets torchrun tear the group down) before the file is complete.
        dist_utils.barrier()
        self.last_checkpoint = dist_utils.broadcast_object(written)


def setup_run(cfg: DinoConfig) -> Run:
    """Step 1 of the module docstring: a run ready for its next step, resumed from ``checkpoint.uri`` if it holds
    a checkpoint (and ``checkpoint.resume``)."""
    cfg.validate()
    if not cfg.data.source:
        raise ConfigError("data.source must be set: a shard-set URI (with manifest.json) or an ImageFolder path")
    ctx = dist_utils.init(cfg.train.device)
    _, use_scaler = resolve_precision(cfg.train.precision, ctx.device)
    if ctx.is_main:
        for removed in remove_stale_writes(cfg.checkpoint.uri):
            log.info("removed what an interrupted checkpoint write left: %s", removed)
    resume_from = latest_checkpoint(cfg.checkpoint.uri) if cfg.checkpoint.resume else None
    resume_from = dist_utils.broadcast_object(resume_from)  # every rank resumes from the same file
    # On the CPU: RNG states must stay CPU tensors; load_state_dict copies the weights to the device.
    state = read_checkpoint(resume_from, map_location="cpu") if resume_from else None
    step, epoch, batch = resume_cursor(state)

    # The loader of the cursor's epoch tells how many steps an epoch has (a finished run builds the last epoch's).
    first_epoch = min(epoch, cfg.train.epochs - 1)
    loader = build_train_loader(cfg, ctx, first_epoch, batch if first_epoch == epoch else 0)
    steps_per_epoch = int(loader.batches_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"data.source {cfg.data.source!r} yields no full batch of {cfg.data.batch_size_per_gpu} "
                         f"per rank with {ctx.world_size} ranks")
    model, optimizer = build_model_and_optimizer(cfg, ctx)
    grad_scaler = torch.amp.GradScaler(ctx.device.type) if use_scaler else None
    schedules = build_schedules(cfg, steps_per_epoch, ctx.world_size)
    if state is not None:
        restore_checkpoint(state, model, optimizer, grad_scaler, cfg, ctx)
        del state
        if ctx.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, epoch, batch)
    cadence = Cadence.from_config(cfg, schedules.total_steps, ctx.device)

    # The fast paths prove themselves on rank 0's first batch, on copies of the plain model, before DDP and
    # compile; every rank takes rank 0's decision (dino_model.fast_path).
    paths = check_training_paths(
        cfg, ctx, loader=loader, augment_on_device=augment_on_device(cfg, ctx.device),
        rebuild_loader=lambda on_device: build_train_loader(cfg, ctx, epoch, batch, on_device=on_device),
        batch_preparer=lambda on_device: batch_preparer(cfg, ctx.device, on_device),
        device_augment=lambda: device_multicrop(cfg.crops, ctx.device), model=model, optimizer=optimizer,
        grad_scaler=grad_scaler, schedules=schedules, step=step, epoch=epoch, nothing_left=cadence.done(step))
    optimizer, grad_scaler = prepare_model(cfg, ctx, model, optimizer, grad_scaler, paths.step_path)

    loggers = build_loggers(cfg.logging.loggers) if ctx.is_main else MultiLogger()  # rank 0 logs
    loggers.on_run_start(schedules.total_steps, cfg.train.epochs)
    global_batch = cfg.data.batch_size_per_gpu * ctx.world_size
    run = Run(cfg=cfg, ctx=ctx, model=model, optimizer=optimizer, grad_scaler=grad_scaler,
              step_settings=StepSettings.from_config(cfg, paths.step_path.autocast_dtype), schedules=schedules,
              cadence=cadence, steps_per_epoch=steps_per_epoch, augment_on_device=paths.augment_on_device,
              step_path=paths.step_path, fast_path={}, first_steps=FirstStepsGuard(cfg.train.fast_path_check,
                                                                                   paths.step_path),
              prepare_batch=batch_preparer(cfg, ctx.device, paths.augment_on_device), loggers=loggers,
              progress=Progress(ctx.is_main and cfg.logging.progress), watch=NonFiniteWatch(ctx.device),
              throughput=Throughput(step, global_batch), step=step, epoch=epoch, batch=batch,
              last_checkpoint=resume_from, loader=paths.loader)
    run.record_fast_path(paths.data, paths.step, announce=False)
    run.progress("start", step=step, total_steps=schedules.total_steps, steps_per_epoch=steps_per_epoch,
                 epochs=cfg.train.epochs, world_size=ctx.world_size, global_batch=global_batch,
                 device=str(ctx.device), precision=paths.step_path.precision, step_path=paths.step_path.describe(),
                 augment_on="device" if paths.augment_on_device else "workers", resumed_from=resume_from,
                 checkpoint_uri=cfg.checkpoint.uri, config=cfg.to_dict(),
                 fast_path={part: v.as_record() for part, v in run.fast_path.items()})
    return run


def run_epoch(run: Run, stop: StopSignals) -> bool:
    """Step 2 of the module docstring: train from the cursor to the end of its epoch, or to ``train.max_steps``,
    or to a stop signal; returns whether a stop signal ended it (after its checkpoint)."""
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
                run.log_step(stats)
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
    if run.cadence.checkpoint(run.step, finished_epoch) or stopping:
        run.write_checkpoint(final=stopping or run.cadence.done(run.step))
    return stopping


def finish(run: Run) -> TrainResult:
    """Step 3 of the module docstring: the teachers agree across ranks; rank 0 exports the teacher backbone."""
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


def train(cfg: DinoConfig) -> TrainResult:
    """Run (or resume) DINO pretraining as configured; see the module docstring."""
    run = setup_run(cfg)
    stop_reason = "failed"
    try:
        with StopSignals() as stop:
            while not run.cadence.done(run.step):
                if run_epoch(run, stop):
                    stop_reason = "cancelled"
                    run.progress("end", status="terminated", step=run.step, epoch=run.epoch,
                                 checkpoint=run.last_checkpoint, total_steps=run.schedules.total_steps,
                                 epochs_done=run.epochs_done)
                    raise TrainingTerminated(stop.requested or int(signal.SIGTERM), run.step, run.last_checkpoint)
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


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dino_model.train",
        description="DINO self-supervised pretraining (run under torchrun for several processes).",
    )
    p.add_argument("--config", help="YAML or JSON config file (sections model/crops/data/loss/optim/train/...)")
    p.add_argument("--preset", help="preset(s) applied before the file: reference, boost, multicrop10, small, "
                                    "resnet50 (comma-separated to chain)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. optim.lr=1e-3")
    return p.parse_args(argv)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (see the module docstring)."""
    args = parse_args(argv)
    # First, before anything slow: from here on a dying parent (torchrun, the flow's launcher) stops this process.
    exit_with_parent_from_env()
    _setup_logging()
    try:
        cfg = load_config(config_source(args.config), args.overrides, preset=args.preset)
        if args.print_config:
            import json

            print(json.dumps(cfg.to_dict(), indent=2))
            return EXIT_OK
        result = train(cfg)
        if dist_utils.is_main_process():
            log.info("training %s at step %d; export: %s", result.status, result.step,
                     result.export["weights"] if result.export else "none")
        return EXIT_OK
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        return EXIT_CONFIG
    except NonFiniteLoss as e:
        log.error("%s", e)
        return EXIT_NONFINITE
    except FastPathError as e:
        log.error("%s", e)
        if dist_utils.is_main_process():
            emit_progress("error", kind="fast_path", part=e.verdict.part, message=str(e),
                          fast_path={e.verdict.part: e.verdict.as_record()})
        return EXIT_FAST_PATH
    except (TrainingTerminated, KeyboardInterrupt) as e:
        log.warning("%s", e)
        return EXIT_TERMINATED
    except Exception:  # noqa: BLE001 - report with the traceback and a non-zero code
        log.exception("training failed")
        if dist_utils.is_main_process():
            with contextlib.suppress(Exception):
                emit_progress("error", kind="exception", message=str(sys.exc_info()[1]))
        return EXIT_FAILURE
    finally:
        dist_utils.cleanup()


if __name__ == "__main__":
    sys.exit(main())

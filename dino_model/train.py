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

What a run does (``train()`` below reads in this order): join the process group (NCCL on GPU, gloo on CPU) ->
seed -> build the data loader for the cursor's epoch -> build student, teacher and loss (student in DDP when
distributed) -> optimiser and per-step schedules -> resume from the latest checkpoint under ``checkpoint.uri`` ->
then per step: lr / weight decay / teacher momentum from the schedule arrays at the global step, forward and
backward, gradient clipping (per parameter by default), drop the last layer's gradients during the
``freeze_last_layer`` epochs, optimiser step, teacher EMA -> metrics, checkpoints every N steps and at epoch ends ->
at the end the teacher backbone is exported (safetensors + JSON, loadable by timm) to ``export.uri``
(default ``<checkpoint.uri>/export``).

Exit codes of ``python -m dino_model.train``:

* 0   finished (all epochs, or ``train.max_steps`` reached; a checkpoint and the export are written)
* 1   any other error (the traceback is printed)
* 2   invalid configuration (the message names the field)
* 3   non-finite loss (the message names the step; no checkpoint is written after it, earlier ones stay intact)
* 143 stopped by SIGTERM or SIGINT: the current step is finished, a checkpoint is written (atomically; a
  second signal abandons it and nothing half-written remains), then the process exits. Under torchrun, each
  worker exits 143 and torchrun itself reports the failure.

Rank 0 prints human-readable metric lines and, with ``logging.progress``, machine-readable lines
``DINO_PROGRESS {json}`` (see :mod:`dino_model.metrics`) for a parent process such as the pretrain flow.
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
from typing import Any

import torch
from torch import nn

from dino_model import distributed as dist_utils
from dino_model.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    latest_checkpoint,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dino_model.config import ConfigError, DinoConfig, load_config
from dino_model.data.device_prefetch import DevicePrefetcher
from dino_model.data.rng import derive_seed
from dino_model.fast_step import FastForwardBackward, resolve_compile
from dino_model.meta_arch import DINO, unwrap
from dino_model.metrics import ConsoleLogger, MetricsLogger, MultiLogger, build_logger, emit_progress
from dino_model.optim import (
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_global,
    clip_gradients_per_param,
    param_groups,
)
from dino_model.schedules import Schedules, build_schedules

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_CONFIG",
    "EXIT_NONFINITE",
    "EXIT_TERMINATED",
    "NonFiniteLoss",
    "TrainingTerminated",
    "TrainResult",
    "StepSettings",
    "train_step",
    "train",
    "main",
]

log = logging.getLogger("dino_model.train")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_TERMINATED = 143  # 128 + SIGTERM, the shell's convention for "terminated by a signal"

# Stats returned by train_step that are averaged over ranks at log steps (order matters: one all-reduce).
_STAT_KEYS = (
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
# the step (kept apart so a compiled / fused GPU version can replace it)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    """Per-run constants of :func:`train_step`."""

    clip_grad: float
    clip_mode: str
    freeze_last_layer: int
    autocast_dtype: torch.dtype | None


def train_step(
    model: DINO,
    optimizer: torch.optim.Optimizer,
    crops: list[torch.Tensor],
    *,
    epoch: int,
    lr: float,
    wd: float,
    momentum: float,
    settings: StepSettings,
    grad_scaler: torch.amp.GradScaler | None = None,
    forward_backward: Any = None,
) -> dict[str, torch.Tensor]:
    """One DINO update, in the reference's order; returns 0-dim device tensors (no host sync).

    lr / wd into the optimiser groups -> forward + backward (and the centre update) -> unscale (fp16) ->
    clip -> drop the last layer's gradients while frozen -> optimiser step -> teacher EMA with ``momentum``.
    ``forward_backward`` replaces ``model.forward_backward`` (same signature), e.g. the compiled
    :class:`dino_model.fast_step.FastForwardBackward`.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_weight_decay", True):
            group["weight_decay"] = wd
    optimizer.zero_grad(set_to_none=True)
    stats = (forward_backward or model.forward_backward)(
        crops,
        epoch,
        autocast_dtype=settings.autocast_dtype,
        grad_scaler=grad_scaler,
        # The caller watches the loss on the device and checks it at sync points (no host sync per step).
        check_finite=False,
    )
    student = model.student_module()
    if grad_scaler is not None:
        grad_scaler.unscale_(optimizer)  # clip the true gradients, as the reference does
    if settings.clip_grad > 0:
        if settings.clip_mode == "global":
            grad_norm = clip_gradients_global(student, settings.clip_grad)
        else:
            grad_norm = clip_gradients_per_param(student, settings.clip_grad).norm()
    else:
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        grad_norm = torch.stack(torch._foreach_norm(grads, 2.0)).norm() if grads else torch.zeros(())
    cancel_last_layer_gradients(student, epoch, settings.freeze_last_layer)
    if grad_scaler is not None:
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        optimizer.step()
    model.update_teacher(momentum)
    stats["grad_norm"] = grad_norm.detach().float()
    return stats


# ------------------------------------------------------------------------------------------------------------------
# pieces of train()
# ------------------------------------------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM / SIGINT -> ``requested`` (the loop stops at the next step boundary); a second signal raises
    ``KeyboardInterrupt`` at once (abandon; atomic writes leave nothing half-written). Main thread only."""

    def __init__(self) -> None:
        self.requested: int = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: abandoning the current step")
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


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to use a GradScaler): ``auto`` = bf16 on GPUs that support it, fp16 with a
    scaler on older GPUs (the reference's mode), fp32 on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def build_model(cfg: DinoConfig, nepochs: int) -> DINO:
    """Student, teacher and loss from the config (seed the global RNG first for identical replicas)."""
    m = cfg.model
    return DINO.build(
        m.arch,
        patch_size=m.patch_size,
        drop_path_rate=m.drop_path_rate,
        out_dim=m.out_dim,
        norm_last_layer=m.norm_last_layer,
        use_bn_in_head=m.use_bn_in_head,
        ncrops=cfg.crops.ncrops,
        warmup_teacher_temp=cfg.loss.warmup_teacher_temp,
        teacher_temp=cfg.loss.teacher_temp,
        warmup_teacher_temp_epochs=cfg.loss.warmup_teacher_temp_epochs,
        nepochs=nepochs,
        student_temp=cfg.loss.student_temp,
        center_momentum=cfg.loss.center_momentum,
        img_size=m.img_size,
        head_nlayers=m.head_nlayers,
        head_hidden_dim=m.head_hidden_dim,
        head_bottleneck_dim=m.head_bottleneck_dim,
    )


def multicrop_config(cfg: DinoConfig):
    """The augmentation settings of ``cfg.crops`` (the rest are the paper's defaults)."""
    return cfg.crops


def augment_on_device(cfg: DinoConfig, device: torch.device) -> bool:
    """``data.augment_on``: whether the training process decodes and augments batches on its device."""
    mode = cfg.data.augment_on
    return mode == "device" or (mode == "auto" and device.type == "cuda")


def build_train_loader(cfg: DinoConfig, ctx: dist_utils.DistContext, epoch: int, start_batch: int = 0):
    """The reader for one epoch, positioned at ``start_batch`` (the saved cursor). With ``data.augment_on``
    resolving to ``device`` the workers yield encoded bytes plus each sample's drawn crop parameters."""
    from dino_model.data.augment import MultiCropAugmentation
    from dino_model.data.gpu_augment import CropParamSampler
    from dino_model.data.reader import build_loader

    on_device = augment_on_device(cfg, ctx.device)
    return build_loader(
        cfg.data.source,
        batch_size=cfg.data.batch_size_per_gpu,
        transform=None if on_device else MultiCropAugmentation(multicrop_config(cfg)),
        decode=not on_device,
        param_sampler=CropParamSampler(multicrop_config(cfg)) if on_device else None,
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


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (a collective: all ranks call it)."""
    mine = capture_rng_state(device)
    if not dist_utils.is_distributed():
        return [mine]
    # Tensors travel through pickling; move them to CPU so any backend can carry them.
    states: list[Any] = [None] * dist_utils.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states


def make_checkpoint(
    cfg: DinoConfig,
    model: DINO,
    optimizer: torch.optim.Optimizer,
    grad_scaler: torch.amp.GradScaler | None,
    *,
    step: int,
    cursor_epoch: int,
    cursor_batch: int,
    rng: list[dict[str, Any]],
    metrics: dict[str, float],
) -> dict[str, Any]:
    """The checkpoint dict (layout in :mod:`dino_model.checkpoint`)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "epoch": cursor_epoch,
        "cursor": {"epoch": cursor_epoch, "batch": cursor_batch},
        "student": model.student_module().state_dict(),
        "teacher": unwrap(model.teacher).state_dict(),
        "dino_loss": model.dino_loss.state_dict(),
        "optimizer": optimizer.state_dict(),
        "grad_scaler": grad_scaler.state_dict() if grad_scaler is not None else {},
        "rng": rng,
        "world_size": dist_utils.get_world_size(),
        "config": cfg.to_dict(),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "torch_version": str(torch.__version__),
    }


def restore_checkpoint(
    ckpt: dict[str, Any],
    cfg: DinoConfig,
    model: DINO,
    optimizer: torch.optim.Optimizer,
    grad_scaler: torch.amp.GradScaler | None,
    ctx: dist_utils.DistContext,
) -> tuple[int, int, int]:
    """Load a checkpoint into the live objects; returns (step, cursor epoch, cursor batch)."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a dino_model training checkpoint (format {ckpt.get('format')!r})")
    saved = ckpt["config"]
    saved_batch = saved["data"]["batch_size_per_gpu"]
    if ckpt["world_size"] != ctx.world_size or saved_batch != cfg.data.batch_size_per_gpu:
        # The cursor counts batches of one global size and the schedules span steps of it: exact resume needs it.
        raise ValueError(
            f"checkpoint was written by {ckpt['world_size']} ranks x {saved_batch} images; this run has "
            f"{ctx.world_size} ranks x {cfg.data.batch_size_per_gpu}: resume needs the same global batch layout "
            "(or set checkpoint.resume=false / a new checkpoint.uri)"
        )
    model.student_module().load_state_dict(ckpt["student"])
    unwrap(model.teacher).load_state_dict(ckpt["teacher"])
    model.dino_loss.load_state_dict(ckpt["dino_loss"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if grad_scaler is not None and ckpt.get("grad_scaler"):
        grad_scaler.load_state_dict(ckpt["grad_scaler"])
    restore_rng_state(ckpt["rng"][ctx.rank], ctx.device)
    return int(ckpt["step"]), int(ckpt["cursor"]["epoch"]), int(ckpt["cursor"]["batch"])


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


def _sync_flags(first_bad: torch.Tensor, stop: int) -> tuple[int | None, int]:
    """Agree across ranks on (first non-finite step or None, stop signal or 0): one small all-reduce (MAX)."""
    flags = torch.stack([-first_bad, torch.tensor(stop, dtype=torch.int64, device=first_bad.device)])
    dist_utils.all_reduce_max(flags)
    neg_bad, stop_any = flags.tolist()  # the host sync
    bad = -neg_bad
    return (bad if bad < _NO_BAD_STEP else None), int(stop_any)


_NO_BAD_STEP = 2**62


def _mean_over_ranks(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    vec = torch.stack([stats[k].float().reshape(()) for k in _STAT_KEYS])
    dist_utils.all_reduce_mean(vec)
    return dict(zip(_STAT_KEYS, vec.tolist()))


# ------------------------------------------------------------------------------------------------------------------
# train()
# ------------------------------------------------------------------------------------------------------------------


def train(cfg: DinoConfig, loggers: MetricsLogger | None = None) -> TrainResult:
    """Run (or resume) DINO pretraining as configured; see the module docstring. ``loggers`` replaces the loggers
    named in ``cfg.logging.loggers`` (rank 0 only; other ranks never log)."""
    cfg.validate()
    if not cfg.data.source:
        raise ConfigError("data.source must be set: a shard-set URI (with manifest.json) or an ImageFolder path")

    # 1. processes and devices
    ctx = dist_utils.init(cfg.train.device)
    device = ctx.device
    autocast_dtype, use_scaler = resolve_precision(cfg.train.precision, device)
    check_every = cfg.train.nonfinite_check_every or (1 if device.type == "cpu" else cfg.logging.log_every)

    # 2. find the checkpoint to resume from (its cursor decides which epoch's loader comes first)
    ckpt_uri = cfg.checkpoint.uri
    resume_from = latest_checkpoint(ckpt_uri) if cfg.checkpoint.resume else None
    resume_from = dist_utils.broadcast_object(resume_from)  # every rank resumes from the same file
    # On the CPU: RNG states must stay CPU tensors; load_state_dict copies the weights to the device.
    ckpt = read_checkpoint(resume_from, map_location="cpu") if resume_from else None
    cursor_epoch = int(ckpt["cursor"]["epoch"]) if ckpt else 0
    cursor_batch = int(ckpt["cursor"]["batch"]) if ckpt else 0

    # 3. data: the loader of the cursor's epoch tells how many steps an epoch has
    first_epoch = min(cursor_epoch, cfg.train.epochs - 1)
    loader = build_train_loader(cfg, ctx, first_epoch, cursor_batch if first_epoch == cursor_epoch else 0)
    steps_per_epoch = int(loader.batches_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"data.source {cfg.data.source!r} yields no full batch of {cfg.data.batch_size_per_gpu} per rank "
            f"with {ctx.world_size} ranks"
        )
    global_batch = cfg.data.batch_size_per_gpu * ctx.world_size

    # 4. model: identical initial replicas on every rank (same seed), student in DDP when distributed
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, cfg.train.epochs).to(device)
    if ctx.world_size > 1 and cfg.model.sync_bn:
        model.convert_sync_batchnorm()
    use_compile = resolve_compile(cfg.train.compile, device)
    optimizer = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()),
                                momentum=cfg.optim.sgd_momentum, fused=device.type == "cuda")
    if dist_utils.is_distributed():
        model.student = nn.parallel.DistributedDataParallel(
            model.student, device_ids=[device.index] if device.type == "cuda" else None
        )
    # On CUDA or with train.compile on: the lean loss, and torch.compile of student, teacher and loss when
    # train.compile resolves to on. Otherwise DINO.forward_backward, the reference formulation, as before.
    fast_forward_backward = (FastForwardBackward(model, compile=use_compile, mode=cfg.train.compile_mode)
                             if use_compile or device.type == "cuda" else None)
    device_augment = None
    if augment_on_device(cfg, device):
        from dino_model.data.gpu_augment import DeviceMultiCrop

        device_augment = DeviceMultiCrop(multicrop_config(cfg), device)
    grad_scaler = torch.amp.GradScaler(device.type) if use_scaler else None

    def prepare_batch(batch: dict[str, Any]) -> list[torch.Tensor]:
        """A loader batch -> the step's crops on the device (runs on the prefetch thread)."""
        if device_augment is not None:  # decode + augment the whole batch on the device
            return device_augment(batch["encoded"], batch["params"])
        return [c.to(device, non_blocking=True) for c in batch["crops"]]

    # 5. schedules: arrays over every step of the run, indexed by the global step
    sched: Schedules = build_schedules(
        epochs=cfg.train.epochs,
        niter_per_ep=steps_per_epoch,
        total_batch=global_batch,
        lr=cfg.optim.lr,
        min_lr=cfg.optim.min_lr,
        warmup_epochs=cfg.optim.warmup_epochs,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=cfg.optim.weight_decay_end,
        momentum_teacher=cfg.optim.momentum_teacher,
        warmup_teacher_temp=cfg.loss.warmup_teacher_temp,
        teacher_temp=cfg.loss.teacher_temp,
        warmup_teacher_temp_epochs=cfg.loss.warmup_teacher_temp_epochs,
    )
    total_steps = sched.total_steps

    # 6. resume
    step = 0
    if ckpt is not None:
        step, cursor_epoch, cursor_batch = restore_checkpoint(ckpt, cfg, model, optimizer, grad_scaler, ctx)
        del ckpt
        if ctx.is_main:
            log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, step, cursor_epoch,
                     cursor_batch)

    # 7. loggers (rank 0 only)
    if ctx.is_main:
        if loggers is None:
            built = []
            for spec in cfg.logging.loggers:
                built.append(ConsoleLogger(total_steps=total_steps) if spec == "console" else build_logger(spec))
            loggers = MultiLogger(built)
    else:
        loggers = MultiLogger()
    progress = ctx.is_main and cfg.logging.progress

    def emit(event: str, **fields: Any) -> None:
        if progress:
            emit_progress(event, **fields)

    emit("start", step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs,
         world_size=ctx.world_size, global_batch=global_batch, device=str(device),
         precision=str(autocast_dtype or "fp32"), resumed_from=resume_from, checkpoint_uri=ckpt_uri,
         config=cfg.to_dict())

    settings = StepSettings(
        clip_grad=cfg.optim.clip_grad,
        clip_mode=cfg.optim.clip_mode,
        freeze_last_layer=cfg.optim.freeze_last_layer,
        autocast_dtype=autocast_dtype,
    )
    max_steps = cfg.train.max_steps
    last_ckpt: str | None = resume_from
    last_metrics: dict[str, float] = {}
    first_bad = torch.tensor(_NO_BAD_STEP, dtype=torch.int64, device=device)
    epoch = cursor_epoch

    def checkpoint_now(cursor_epoch_: int, cursor_batch_: int) -> str | None:
        """Write a checkpoint at the current step (a collective: every rank calls it; rank 0 writes)."""
        nonlocal last_ckpt
        rng = gather_rng_states(device)
        written = None
        if ctx.is_main:
            state = make_checkpoint(cfg, model, optimizer, grad_scaler, step=step, cursor_epoch=cursor_epoch_,
                                    cursor_batch=cursor_batch_, rng=rng, metrics=last_metrics)
            written = save_checkpoint(ckpt_uri, state, keep_last=cfg.checkpoint.keep_last)
            emit("checkpoint", step=step, epoch=cursor_epoch_, uri=written)
            hook = getattr(loggers, "on_checkpoint", None)  # e.g. MLflow uploads it as a run artifact
            if hook is not None:
                hook(written, step)
            log.info("checkpoint written: %s", written)
        # Nobody leaves (or lets torchrun tear the group down) before the file is complete.
        dist_utils.barrier()
        last_ckpt = dist_utils.broadcast_object(written)
        return last_ckpt

    batches: DevicePrefetcher | None = None
    try:
        with StopSignals() as stop:
            # 8. the loop: epochs from the cursor, batches from the cursor within its epoch
            finished = step >= total_steps or (max_steps is not None and step >= max_steps)
            t_last, step_last = time.perf_counter(), step
            while not finished and epoch < cfg.train.epochs:
                if loader is None:
                    loader = build_train_loader(cfg, ctx, epoch, 0)
                    cursor_batch = 0
                if int(loader.batches_per_epoch) != steps_per_epoch:
                    raise RuntimeError(
                        f"epoch {epoch} has {loader.batches_per_epoch} batches, the first had {steps_per_epoch}: "
                        "the schedules assume a constant epoch length"
                    )
                epoch_loss = torch.zeros((), device=device)
                epoch_steps = 0
                batch_index = cursor_batch
                stop_requested = reached_max = False
                # Batches arrive as crops on the device, prepared ahead on a side thread / CUDA stream.
                batches = DevicePrefetcher(loader, prepare_batch, device, depth=cfg.data.prefetch_batches)
                for crops in batches:
                    it = step  # schedule index of this update
                    # Randomness inside the step (drop-path) is a function of (seed, rank, step) rather than of
                    # everything drawn before, so a resumed run draws what the uninterrupted one drew.
                    torch.manual_seed(derive_seed(cfg.train.seed, "step", ctx.rank, it))
                    stats = train_step(
                        model, optimizer, crops, epoch=epoch, lr=float(sched.lr[it]), wd=float(sched.wd[it]),
                        momentum=float(sched.momentum[it]), settings=settings, grad_scaler=grad_scaler,
                        forward_backward=fast_forward_backward,
                    )
                    step += 1
                    batch_index += 1
                    epoch_steps += 1
                    epoch_loss += stats["loss"]
                    # Device-side watch: remember the first step whose loss was not finite, without a sync.
                    first_bad = torch.where(torch.isfinite(stats["loss"]), first_bad,
                                            torch.clamp(first_bad, max=step))

                    end_of_epoch = batch_index >= steps_per_epoch
                    reached_max = max_steps is not None and step >= max_steps
                    log_now = step % cfg.logging.log_every == 0 or step == 1 or reached_max or step == total_steps
                    ckpt_now = cfg.checkpoint.every_n_steps > 0 and step % cfg.checkpoint.every_n_steps == 0
                    # Every decision below is taken identically on all ranks: the flags are agreed at sync points.
                    if (step % check_every == 0 or log_now or ckpt_now or reached_max or end_of_epoch
                            or (stop.requested and not dist_utils.is_distributed())):
                        bad_step, stop_any = _sync_flags(first_bad, stop.requested)
                        if bad_step is not None:
                            emit("error", kind="nonfinite", step=bad_step, epoch=epoch, last_checkpoint=last_ckpt)
                            raise NonFiniteLoss(bad_step, epoch, last_ckpt)
                        stop_requested = bool(stop_any)

                    if log_now:
                        now = time.perf_counter()
                        metrics = _mean_over_ranks(stats)
                        metrics.update(
                            epoch=float(epoch),
                            lr=float(sched.lr[it]),
                            wd=float(sched.wd[it]),
                            momentum=float(sched.momentum[it]),
                            teacher_temp=float(sched.teacher_temp[epoch]),
                            images_per_s=(step - step_last) * global_batch / max(now - t_last, 1e-9),
                        )
                        if grad_scaler is not None:  # fp16: NaN/inf gradients mean a skipped step and a lower scale
                            metrics["grad_scale"] = float(grad_scaler.get_scale())
                        t_last, step_last = now, step
                        last_metrics = metrics
                        loggers.log(step, metrics)
                        emit("step", **{"step": step, "total_steps": total_steps, "batch": batch_index,
                                        **metrics, "epoch": epoch})

                    if end_of_epoch:
                        break  # the epoch-end checkpoint below covers every reason to write one now
                    if ckpt_now or reached_max or stop_requested:
                        checkpoint_now(epoch, batch_index)
                    if reached_max or stop_requested:
                        break
                batches.close()  # drop what was prepared ahead (a resume re-reads it from the cursor)
                loader = batches = None  # the workers shut down before the next epoch's start

                if batch_index >= steps_per_epoch:  # the epoch is complete
                    mean_loss = dist_utils.all_reduce_mean((epoch_loss / max(epoch_steps, 1)).reshape(1))
                    mean_loss_value = float(mean_loss.item())
                    emit("epoch", epoch=epoch, step=step, loss=mean_loss_value)
                    if ctx.is_main:
                        log.info("epoch %d done at step %d, mean loss %.4f", epoch, step, mean_loss_value)
                    if ((epoch + 1) % cfg.checkpoint.every_n_epochs == 0 or epoch + 1 == cfg.train.epochs
                            or reached_max or stop_requested
                            or (cfg.checkpoint.every_n_steps > 0 and step % cfg.checkpoint.every_n_steps == 0)):
                        checkpoint_now(epoch + 1, 0)
                    epoch += 1
                    cursor_batch = 0
                if stop_requested:
                    emit("end", status="terminated", step=step, epoch=epoch, checkpoint=last_ckpt)
                    raise TrainingTerminated(stop.requested or int(signal.SIGTERM), step, last_ckpt)
                if reached_max:
                    break
        status = "completed" if step >= total_steps else "max_steps"
        replicas_identical = teacher_replicas_identical(model)
        if not replicas_identical and ctx.is_main:
            log.warning("teacher weights differ between ranks: the replicas drifted apart")

        # 9. export the teacher backbone
        export = None
        if cfg.export.enabled and ctx.is_main:
            from dino_model.export import export_backbone

            export = export_backbone(
                model.teacher_backbone(),
                cfg.export.uri or f"{ckpt_uri.rstrip('/')}/export",
                arch=cfg.model.arch,
                patch_size=cfg.model.patch_size,
                img_size=cfg.model.img_size,
                step=step,
                epoch=epoch,
                training_config=cfg.to_dict(),
            )
            log.info("teacher backbone exported: %s", export["weights"])
        dist_utils.barrier()
        emit("end", status=status, step=step, epoch=epoch, checkpoint=last_ckpt, export=export,
             teacher_replicas_identical=replicas_identical)
        return TrainResult(step=step, epoch=epoch, status=status, checkpoint=last_ckpt, export=export,
                           metrics=last_metrics)
    finally:
        if batches is not None:  # left the loop by an exception: stop the prefetch thread
            batches.close()
        loggers.close()


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
    _setup_logging()
    try:
        cfg = load_config(args.config, args.overrides, preset=args.preset)
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
    except (TrainingTerminated, KeyboardInterrupt) as e:
        log.error("%s", e)
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

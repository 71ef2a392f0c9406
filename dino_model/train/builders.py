"""What a training run is built from: the data loader of an epoch and the step's batch preparer, the model and its
optimiser, the model put on its step path (DDP, compile, fused AdamW), the resume checks, and the end-of-run check
that every rank holds the same teacher."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from dino_model import distributed as dist_utils
from dino_model.config import DinoConfig
from dino_model.data.reader import LoaderSettings, build_loader
from dino_model.fast_path.data_canary import device_multicrop
from dino_model.fast_path.step_canary import StepPath, compile_model
from dino_model.meta_arch import DINO, unwrap
from dino_model.optim import build_optimizer, load_optimizer_state, optimizer_state, param_groups
from dino_model.step import TrainingState

__all__ = ["augment_on_device", "loader_settings", "build_train_loader", "batch_preparer", "CursorData", "build_training_state",
           "prepare_model", "check_resume_layout", "teacher_replicas_identical"]


def augment_on_device(cfg: DinoConfig, device: torch.device) -> bool:
    """``data.augment_on``: whether the training process decodes and augments batches on its device."""
    mode = cfg.data.augment_on
    return mode == "device" or (mode == "auto" and device.type == "cuda")


def loader_settings(cfg: DinoConfig, ctx: dist_utils.DistContext) -> LoaderSettings:
    """How this rank reads the training data, every epoch (``data.*``, ``train.seed``, the rank's place)."""
    return LoaderSettings(batch_size=cfg.data.batch_size_per_gpu, seed=cfg.train.seed, rank=ctx.rank,
                          world_size=ctx.world_size, num_workers=cfg.data.num_workers, resampled=cfg.data.resampled,
                          epoch_length=cfg.data.epoch_length, shuffle_buffer=cfg.data.shuffle_buffer,
                          pin_memory=cfg.data.pin_memory and ctx.device.type == "cuda")


def build_train_loader(cfg: DinoConfig, ctx: dist_utils.DistContext, epoch: int, start_batch: int = 0,
                       on_device: bool | None = None):
    """The reader for one epoch, positioned at ``start_batch`` (the saved cursor). ``on_device`` (default: as
    ``data.augment_on`` resolves): the workers yield encoded bytes plus each sample's drawn crop parameters, for
    the training process to decode and augment on its device; else they augment."""
    from dino_model.data.augment import MultiCropAugmentation
    from dino_model.data.gpu_augment import CropParamSampler

    on_device = augment_on_device(cfg, ctx.device) if on_device is None else on_device
    return build_loader(cfg.data.source, loader_settings(cfg, ctx), epoch=epoch, start_batch=start_batch,
                        transform=None if on_device else MultiCropAugmentation(cfg.crops), decode=not on_device,
                        param_sampler=CropParamSampler(cfg.crops) if on_device else None)


def batch_preparer(cfg: DinoConfig, device: torch.device,
                   on_device: bool | None = None) -> Callable[[dict[str, Any]], list[torch.Tensor]]:
    """A loader batch -> the step's crops on the device (runs on the prefetch thread): decode + augment the whole
    batch on the device (``on_device``, default as ``data.augment_on`` resolves), or copy the workers' crops
    there."""
    if augment_on_device(cfg, device) if on_device is None else on_device:
        augment = device_multicrop(cfg.crops, device)
        return lambda batch: augment(batch["encoded"], batch["params"])
    return lambda batch: [c.to(device, non_blocking=True) for c in batch["crops"]]


@dataclass
class CursorData:
    """The data side of a run at its cursor ``(epoch, batch)``: the loader of that epoch positioned there, and the
    batch preparer, for either data path (``on_device``: decode and augment on the device; else the CPU workers
    augment). What the fast-path checks use (:class:`dino_model.fast_path.training.RunData`)."""

    cfg: DinoConfig
    ctx: dist_utils.DistContext
    epoch: int
    batch: int

    @property
    def augment_on_device(self) -> bool:
        """The configured data path (``data.augment_on``)."""
        return augment_on_device(self.cfg, self.ctx.device)

    def loader(self, on_device: bool) -> Any:
        return build_train_loader(self.cfg, self.ctx, self.epoch, self.batch, on_device=on_device)

    def preparer(self, on_device: bool) -> Callable[[dict[str, Any]], list[torch.Tensor]]:
        return batch_preparer(self.cfg, self.ctx.device, on_device)


def build_training_state(cfg: DinoConfig, ctx: dist_utils.DistContext,
                         grad_scaler: torch.amp.GradScaler | None) -> TrainingState:
    """Student, teacher and loss on this rank's device — identical initial replicas on every rank (same seed) —
    and the reference's (for-each) optimiser: plain, so the fast-path check can copy them; :func:`prepare_model`
    makes them what the step path needs."""
    torch.manual_seed(cfg.train.seed)
    model = DINO.from_config(cfg).to(ctx.device)
    optimizer = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()),
                                momentum=cfg.optim.sgd_momentum)
    return TrainingState(model, optimizer, grad_scaler)


def prepare_model(cfg: DinoConfig, ctx: dist_utils.DistContext, state: TrainingState, path: StepPath | None) -> None:
    """Put the model of ``state`` on step path ``path`` (in place): SyncBatchNorm when distributed with
    ``model.sync_bn``, the student in DDP when distributed, compiled when the path is; the optimiser rebuilt fused
    or not as the path says, its state kept; a GradScaler for fp16 only. ``path=None``: back to plain (not
    compiled, no DDP), for the first-steps guard's check."""
    model = state.model
    model.uncompile()
    model.student = unwrap(model.student)
    if path is None:
        return
    if ctx.world_size > 1 and cfg.model.sync_bn:
        model.convert_sync_batchnorm()
    rebuilt = build_optimizer(cfg.optim.optimizer, param_groups(model.student_module()),
                              momentum=cfg.optim.sgd_momentum, fused=path.fused)
    load_optimizer_state(rebuilt, optimizer_state(state.optimizer))
    state.optimizer = rebuilt
    if path.autocast_dtype != torch.float16:
        state.grad_scaler = None
    elif state.grad_scaler is None:
        state.grad_scaler = torch.amp.GradScaler(ctx.device.type)
    if dist_utils.is_distributed():
        model.student = nn.parallel.DistributedDataParallel(
            model.student, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    if path.compiled:
        compile_model(model, path)


def check_resume_layout(checkpoint: Mapping[str, Any], cfg: DinoConfig, ctx: dist_utils.DistContext) -> None:
    """A checkpoint resumes exactly only with the global batch layout it was written with: the cursor counts
    batches of one global size and the schedules span steps of it."""
    saved_batch = checkpoint["config"]["data"]["batch_size_per_gpu"]
    if checkpoint["world_size"] != ctx.world_size or saved_batch != cfg.data.batch_size_per_gpu:
        raise ValueError(
            f"checkpoint was written by {checkpoint['world_size']} ranks x {saved_batch} images; this run has "
            f"{ctx.world_size} ranks x {cfg.data.batch_size_per_gpu}: resume needs the same global batch layout "
            "(or set checkpoint.resume=false / a new checkpoint.uri)"
        )


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
